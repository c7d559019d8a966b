"""--stream-weights: compress a checkpoint larger than host memory, reading one decoder block at a time.

The model is built as a skeleton with no weights (parameters on `meta`; buffers real, so rotary tables are
computed as in a normal load). The tensors outside the decoder blocks (embeddings, final norm, LM head) are
read from the checkpoint's safetensors files at once; each block's tensors are read only when the pipeline
reaches the block (`BlockWeightStream.ensure`), and the next block's are read by a background thread while
this one is compressed. A compressed block stays on CPU (it is much smaller); a block the pipeline only reads
(WeLore's spectra pass) goes back to `meta` afterwards. Host memory is then the non-block tensors, the
compressed blocks, two dense blocks and the calibration activations.

The checkpoint's tensor names must be the model's state_dict names: checkpoints that transformers converts
on load (renamed or fused keys), .bin / GGUF files and Rankwise checkpoints are refused with one line.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rankwise.errors import RankwiseError, first_line
from rankwise.compress.arch import check_finite_weights, find_decoder_blocks, find_linears
from rankwise.compress.loading import (ALWAYS_IGNORED, is_rankwise_checkpoint, load_config, load_tokenizer,
                                      looks_local, resolve_device, resolve_dtype)
from rankwise.compress.lowrank import RANKWISE_KEY, first_nonfinite, nonfinite_message

DROP = "drop --stream-weights to load it the normal way"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@contextmanager
def open_tensors(file: Path):
    """safetensors' safe_open on CPU; a damaged file (truncated, not safetensors) is one line naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise RankwiseError(f"the checkpoint file {str(file)!r} is corrupt ({first_line(e, 200)}): download or "
                            f"save it again") from None


def checkpoint_folder(ref: str) -> Path:
    """A local folder as is; a hub id through the local cache / the hub (config and safetensors only)."""
    if looks_local(ref):
        return Path(ref).expanduser()
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise RankwiseError(f"cannot fetch {ref!r} for --stream-weights: {first_line(e, 300)}") from None


def tensor_files(folder: Path, ref: str) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (sharded index or one model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with open_tensors(single) as f:
            return {name: single for name in f.keys()}
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".bin", ".pt", ".gguf",
                                                                                    ".safetensors"))
    raise RankwiseError(f"--stream-weights reads safetensors checkpoints (model.safetensors or "
                        f"model.safetensors.index.json) and {ref!r} has none"
                        f"{' (found ' + ', '.join(found[:3]) + ')' if found else ''}: {DROP}")


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model with every parameter on `meta` and every buffer real on CPU (include_buffers=False keeps
    the non-persistent ones, e.g. rotary inv_freq, computed by the modules themselves as in a normal load)."""
    import transformers
    from accelerate import init_empty_weights
    try:
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                                  trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise RankwiseError(f"unsupported model: {first_line(e, 300)}") from None
    return model.eval()


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype):
    """transformers' per-module dtype exceptions (`_keep_in_fp32_modules`): a regex, or None."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    return re.compile("|".join(f"(?:{k.replace('*', '.*')})" for k in plan)) if plan else None


def check_names(model: nn.Module, ckpt_names: set[str], ref: str) -> None:
    """Fail unless every parameter is in the checkpoint under its own name (a tied one through its partner)
    and every checkpoint name is one of the model's."""
    model_names = set(model.state_dict().keys())
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    partners: dict[str, set[str]] = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    missing = sorted(p for p in params if p not in ckpt_names and not partners.get(p, set()) & ckpt_names)
    ignored = re.compile("|".join([*ALWAYS_IGNORED, *(getattr(model, "_keys_to_ignore_on_load_unexpected", None)
                                                      or [])]))
    unexpected = sorted(n for n in ckpt_names - model_names if not ignored.search(n))
    if missing or unexpected:
        example = (f"{missing[0]!r} is not in the checkpoint" if missing
                   else f"the checkpoint's {unexpected[0]!r} is not a model tensor")
        raise RankwiseError(f"--stream-weights needs the checkpoint's tensor names to be the model's, and {ref!r} "
                            f"differs ({example}): {DROP} (transformers renames or converts tensors on load)")


class BlockWeightStream:
    """Reads decoder blocks' tensors from safetensors into a skeleton model, one block at a time.

    `ensure(i)` puts block i's weights on CPU (waiting for its prefetch if one was started) and starts
    reading block i+1 in a worker thread; `release(i)` puts block i back on meta. The worker only reads and
    casts (safetensors and torch release the GIL); modules are changed on the caller's thread only.
    """

    def __init__(self, model: nn.Module, files: dict[str, Path], dtypes: dict[str, torch.dtype]):
        self.model, self.files, self.dtypes = model, files, dtypes
        self.prefix, self.blocks = find_decoder_blocks(model)
        self.names = [sorted(n for n in dtypes if n.startswith(f"{self.prefix}.{i}.")) for i in range(len(self))]
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankwise-prefetch")

    def __len__(self) -> int:
        return len(self.blocks)

    def is_meta(self, i: int) -> bool:
        return any(p.device.type == "meta" for p in self.blocks[i].parameters())

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors from disk, copied out of the file and cast to their model dtype. safetensors
        hands out views of a memory map, read from disk only when first touched: the copy does the reading
        here (in the prefetch thread), and lets each read's mapping go at once, so no page of the file stays
        resident (and counted in RSS) after its block is compressed."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with open_tensors(file) as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(self.dtypes[name] if t.is_floating_point() else t.dtype, copy=True)
        return out

    def read_block(self, i: int) -> dict[str, torch.Tensor]:
        return self.read(self.names[i])

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        from accelerate.utils import set_module_tensor_to_device
        bad = first_nonfinite(tensors.items())
        if bad is not None:
            raise RankwiseError(nonfinite_message(str(self.files[bad[0]]), *bad))
        for name, t in tensors.items():
            set_module_tensor_to_device(self.model, name, "cpu", value=t, dtype=t.dtype, clear_cache=False)

    def prefetch(self, i: int) -> None:
        if 0 <= i < len(self) and i not in self.pending and self.is_meta(i):
            self.pending[i] = self.pool.submit(self.read_block, i)

    def ensure(self, i: int) -> None:
        if self.is_meta(i):
            future = self.pending.pop(i, None)
            self.load(future.result() if future is not None else self.read_block(i))
            check_finite_weights({f"{self.prefix}.{i}.{n}": lin for n, lin in find_linears(self.blocks[i]).items()})
        self.prefetch(i + 1)

    def release(self, i: int) -> None:
        from accelerate.utils import set_module_tensor_to_device
        for name in self.names[i]:
            set_module_tensor_to_device(self.model, name, "meta", clear_cache=False)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def open_streaming_model(ref: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Returns (model, tokenizer, stream): the model with everything but its decoder blocks loaded (blocks on
    meta), and the BlockWeightStream that fills them in. Every check runs before a weight is read."""
    config = load_config(ref, trust_remote_code)
    if getattr(config, RANKWISE_KEY, None) or (os.path.isdir(ref) and is_rankwise_checkpoint(ref)):
        raise RankwiseError(f"{ref!r} is a Rankwise checkpoint: --stream-weights reads dense checkpoints only "
                            f"({DROP})")
    files = tensor_files(checkpoint_folder(ref), ref)
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    if torch_dtype == "auto":  # as transformers: the config's dtype, else the checkpoint's first float tensor's
        torch_dtype = getattr(config, "dtype", None) or _first_float_dtype(files)
        torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    model = build_skeleton(config, torch_dtype, trust_remote_code)
    check_names(model, set(files), ref)

    keep_fp32 = _keep_in_fp32(model, torch_dtype)
    model_tensors = model.state_dict(keep_vars=True)
    dtypes = {name: (torch.float32 if keep_fp32 is not None and keep_fp32.search(name) else model_tensors[name].dtype)
              for name in files if name in model_tensors}
    stream = BlockWeightStream(model, files, dtypes)
    block_prefix = f"{stream.prefix}."
    stream.load(stream.read([n for n in dtypes if not n.startswith(block_prefix)]))
    # Loading replaced the embedding Parameter: tie the head to it again, as from_pretrained does (tied names
    # absent from the checkpoint count as missing, so a checkpoint holding only the head's copy also works).
    model.tie_weights(missing_keys=set(model_tensors) - set(files), recompute_mapping=False)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(block_prefix)]
    if still_meta:
        raise RankwiseError(f"--stream-weights could not fill {still_meta[0]!r} from {ref!r}: {DROP}")

    folder = files[next(iter(files))].parent
    if (folder / "generation_config.json").is_file():  # what from_pretrained reads, so the checkpoint carries it
        import transformers
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model, load_tokenizer(ref, trust_remote_code), stream


def _first_float_dtype(files: dict[str, Path]) -> torch.dtype:
    for name, file in files.items():
        with open_tensors(file) as f:
            dtype = SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
        if dtype is not None:
            return dtype
    return torch.float32
