"""Load a causal LM (hub id, local dense checkpoint or Rankwise checkpoint) with clear errors."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from rankwise.errors import RankwiseError, first_line
from rankwise.compress.lowrank import (AUTO_MAP, RANKWISE_KEY, CheckpointError, checkpoint_file, first_nonfinite,
                                       load_rankwise_model, nonfinite_message)

# Checkpoint names a normal load drops silently (transformers' own exceptions, modeling_utils.py).
ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# torch's spellings (as lm-eval and transformers take them) for the short names
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def normalize_dtype(name: str) -> str:
    """auto, fp32, fp16 or bf16 from those or float32, float16, bfloat16; anything else is one clear error."""
    short = DTYPE_ALIASES.get(name, name)
    if short != "auto" and short not in DTYPE_NAMES:
        raise RankwiseError(f"unknown dtype {name!r}: use auto, fp32 (float32), fp16 (float16) or bf16 (bfloat16)")
    return short


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RankwiseError(f"device {name!r} requested but no CUDA device is available (use --device cpu)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise RankwiseError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return torch.device(name)


@contextmanager
def kept_random_state(device: torch.device, seed: int | None = None):
    """torch's global generators (the CPU's, and `device`'s when it is CUDA), seeded with `seed` when given, and
    given back to the caller as they were on exit."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """'auto' keeps the checkpoint's dtype on GPU and uses float32 on CPU (fp16 matmuls are slow there)."""
    name = normalize_dtype(name)
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return DTYPE_NAMES[name]


def looks_local(ref: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else path-like is a local path."""
    return os.path.exists(ref) or ref.startswith((".", "/", "~")) or ref.count("/") > 1


def is_rankwise_checkpoint(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return RANKWISE_KEY in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _raw_config(ref: str) -> dict | None:
    """config.json as stored (local folder, hub cache or hub), before transformers runs any code it names;
    None when it cannot be read (transformers' own load then says why)."""
    try:
        path = checkpoint_file(ref, "config.json", required=False)
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except Exception:  # noqa: BLE001 - reported by AutoConfig below, with its own message
        return None
    return cfg if isinstance(cfg, dict) else None


def check_own_code_only(ref: str, raw: dict) -> None:
    """A Rankwise checkpoint's auto_map names only its own modeling_rankwise.py: a checkpoint whose config.json
    names other code (an AutoConfig module, another model class) is refused before anything is imported."""
    foreign = {k: v for k, v in (raw.get("auto_map") or {}).items() if AUTO_MAP.get(k) != v}
    if foreign:
        key, value = next(iter(foreign.items()))
        raise RankwiseError(f"Rankwise checkpoint {ref!r}: config.json's auto_map names code other than its own "
                            f"modeling_rankwise.py ({key}: {value!r}); refusing to run it (a Rankwise checkpoint's "
                            f"auto_map is {AUTO_MAP})")


def load_config(ref: str, trust_remote_code: bool = False):
    """The model's config. A Rankwise checkpoint is loaded by Rankwise's own code: none of the checkpoint's
    code runs, whatever trust_remote_code says, and a checkpoint naming other code is refused."""
    import transformers
    if looks_local(ref) and not os.path.isdir(ref):
        raise RankwiseError(f"model path {ref!r} does not exist")
    raw = _raw_config(ref)
    if raw is not None and RANKWISE_KEY in raw:
        check_own_code_only(ref, raw)
        trust_remote_code = False
    try:
        return transformers.AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RankwiseError(f"cannot load model {ref!r}: {first_line(e, 300)}") from None


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RankwiseError(f"cannot load the tokenizer of {ref!r}: {first_line(e, 300)}") from None


def _first_keys(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_loading_info(ref: str, missing, unexpected) -> None:
    """transformers fills a tensor missing from the checkpoint with random values and only logs it (and the
    CLI hides its logs): a missing or unexpected tensor is an error here, naming the first few."""
    unexpected = [k for k in unexpected if not any(re.search(p, k) for p in ALWAYS_IGNORED)]
    if not missing and not unexpected:
        return
    problems = ([f"no tensor for {_first_keys(missing)}"] if missing else []) + \
               ([f"tensors the model lacks: {_first_keys(unexpected)}"] if unexpected else [])
    hint = "damaged or incomplete checkpoint, or one made for another architecture"
    if any(k.endswith((".A.weight", ".B.weight")) for k in unexpected):
        hint = "low-rank factors: a Rankwise checkpoint whose config.json lost its 'rankwise' section?"
    raise RankwiseError(f"checkpoint {ref!r} has {'; '.join(problems)} ({hint})")


def check_finite_tensors(named_tensors, ref: str) -> None:
    """Refuse a model whose weights hold NaN or Inf (any tensor: embeddings, head, norms, Linears), naming the
    first such tensor: no result computed from it means anything."""
    bad = first_nonfinite(named_tensors)
    if bad is not None:
        raise RankwiseError(nonfinite_message(f"checkpoint {ref!r}", *bad))


def load_model(ref: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               place_on_device: bool = True):
    """Returns (model, tokenizer, config). With place_on_device=False the weights stay on CPU (the
    block-sequential pipeline moves one block at a time to the device)."""
    import transformers
    config = load_config(ref, trust_remote_code)
    if getattr(config, RANKWISE_KEY, None):  # loaded by Rankwise's own code: none of the checkpoint's runs
        trust_remote_code = False
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(ref, trust_remote_code)
    target = dev if place_on_device else torch.device("cpu")
    try:
        if getattr(config, RANKWISE_KEY, None):
            from rankwise.compress.metadata import parse_result
            parse_result(getattr(config, RANKWISE_KEY), ref)  # a newer format is refused before any weight
            model = load_rankwise_model(ref, dtype=None if torch_dtype == "auto" else torch_dtype,
                                        device=target, config=config)
        else:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                ref, dtype=torch_dtype, trust_remote_code=trust_remote_code, device_map=str(target),
                output_loading_info=True)
            check_loading_info(ref, info["missing_keys"], info["unexpected_keys"])
            check_finite_tensors(model.named_parameters(), ref)
    except RankwiseError:
        raise
    except CheckpointError as e:
        raise RankwiseError(f"cannot load model {ref!r}: {first_line(e, 400)}") from None
    except ValueError as e:
        raise RankwiseError(f"unsupported model {ref!r}: {first_line(e, 300)}") from None
    except Exception as e:
        raise RankwiseError(f"cannot load model {ref!r}: {first_line(e, 300)}") from None
    model.eval()
    return model, tokenizer, config


def max_context(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(text, key, None):
            return int(getattr(text, key))
    return None
