"""Models for the benchmarks: a real one (hub id / local path) or a real *shape* with random weights.

A shape (LLaMA-7B/13B/70B, TinyLlama-1B, tiny) is built without downloading anything. Decoder blocks are
created on the `meta` device (no memory) and materialised with small random weights either all at once or,
with `lazy=True`, one block at a time just before the pipeline reaches it (see `BlockMaterializer`), so a
70B-shaped model never needs its dense weights in host memory all at once.
"""
from __future__ import annotations

import os

import torch

from rankwise.compress.peak_memory import PeakMemory as Peaks, peak_memory, reset_peak_memory


# name -> LlamaConfig fields (hidden, intermediate, heads, kv heads, layers, vocab)
SHAPES = {
    "tiny": (64, 160, 4, 2, 2, 320),
    "135m": (576, 1536, 9, 3, 30, 49152),     # SmolLM2-135M
    "1b": (2048, 5632, 32, 4, 22, 32000),     # TinyLlama-1.1B
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "70b": (8192, 28672, 64, 8, 80, 32000),
}
INIT_STD = 0.02  # small random weights keep activations finite through many residual blocks


def add_model_source_args(parser) -> None:
    """--model | --shape, and --layers: how both bench scripts name the model they measure."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id or local path of a (dense) causal LM")
    src.add_argument("--shape", help="random weights of a real shape: " + ", ".join(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")


def shape_config(shape: str, layers: int | None = None):
    import transformers
    if shape not in SHAPES:
        from rankwise.errors import RankwiseError
        raise RankwiseError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    hidden, inter, heads, kv, n_layers, vocab = SHAPES[shape]
    return transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
        num_hidden_layers=layers or n_layers, vocab_size=vocab, max_position_embeddings=4096,
        tie_word_embeddings=False)


def random_parameters(module: torch.nn.Module, seed: int):
    """(name, new float32 CPU tensor) for each parameter of `module`: norms 1, matrices N(0, INIT_STD), other
    vectors 0. Generated in float32 on CPU (same numbers whatever the dtype); no module is touched, so a
    worker thread may call it (meta modules too: only shapes are read)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm"):
            yield name, torch.ones(p.shape)
        elif p.dim() >= 2:
            yield name, torch.randn(p.shape, generator=gen) * INIT_STD
        else:
            yield name, torch.zeros(p.shape)


@torch.no_grad()
def _init_random(module: torch.nn.Module, seed: int) -> None:
    params = dict(module.named_parameters())
    for name, value in random_parameters(module, seed):
        params[name].copy_(value)


class BlockMaterializer:
    """Turns meta decoder blocks into random CPU blocks: block i with seed `seed + 1000 + i` (reproducible).

    Also a pipeline block source (the interface of compress.streaming.BlockWeightStream): `ensure(i)` fills
    block i in (waiting for its prefetch) and starts making block i+1's tensors in a worker thread, so a lazy
    shape is measured with the same overlap as `--stream-weights` reading a real checkpoint.
    """

    def __init__(self, blocks, dtype: torch.dtype, seed: int):
        self.blocks, self.dtype, self.seed = blocks, dtype, seed
        self.pending: dict = {}
        self.pool = None

    def is_meta(self, i: int) -> bool:
        return next(self.blocks[i].parameters()).device.type == "meta"

    def random_tensors(self, i: int, block: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Block i's parameters as new tensors in the model dtype (safe in a worker thread: the block is
        passed in, since the list may hold a stand-in for it meanwhile, e.g. during the input capture)."""
        block = self.blocks[i] if block is None else block
        return {name: t.to(self.dtype) for name, t in random_parameters(block, self.seed + 1000 + i)}

    def materialize(self, i: int, tensors: dict[str, torch.Tensor] | None = None) -> None:
        if i < len(self.blocks) and self.is_meta(i):
            tensors = tensors if tensors is not None else self.random_tensors(i)
            block = self.blocks[i].to_empty(device="cpu").to(self.dtype)
            with torch.no_grad():
                for name, p in block.named_parameters():
                    p.copy_(tensors[name])

    def materialize_all(self) -> None:
        for i in range(len(self.blocks)):
            self.materialize(i)

    def ensure(self, i: int) -> None:
        future = self.pending.pop(i, None)
        self.materialize(i, future.result() if future is not None else None)
        if i + 1 < len(self.blocks) and self.is_meta(i + 1) and i + 1 not in self.pending:
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-prefetch")
            self.pending[i + 1] = self.pool.submit(self.random_tensors, i + 1, self.blocks[i + 1])

    def release(self, i: int) -> None:
        """A block only read (WeLore's spectra pass) goes back to meta."""
        self.blocks[i].to("meta")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def random_model(shape: str, layers: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                 lazy: bool = False):
    """A LlamaForCausalLM of the given shape with random weights. Returns (model, materializer).

    The embeddings, norm and head are real CPU tensors; the blocks are meta until materialised (all of them
    now unless `lazy`).
    """
    import transformers
    cfg = shape_config(shape, layers)
    with torch.device("meta"):
        full = transformers.LlamaForCausalLM(cfg)
    shell_cfg = shape_config(shape, 1)
    shell = transformers.LlamaForCausalLM(shell_cfg)  # real rotary tables, embeddings, head (1 block)
    shell.model.layers = full.model.layers  # meta blocks built with the full config (right layer indices)
    shell.config.num_hidden_layers = cfg.num_hidden_layers
    if getattr(cfg, "layer_types", None) is not None:
        shell.config.layer_types = cfg.layer_types
    _init_random(shell.model.embed_tokens, seed)
    _init_random(shell.lm_head, seed + 1)
    shell.to(dtype).eval()
    mat = BlockMaterializer(shell.model.layers, dtype, seed)
    if not lazy:
        mat.materialize_all()
    return shell, mat


def load_real_model(ref: str, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) of a hub id / local dense checkpoint, weights on CPU (the pipeline moves blocks)."""
    from rankwise.compress.loading import load_model
    model, tokenizer, _ = load_model(ref, dtype, device, place_on_device=False)
    return model, tokenizer


def random_ids(vocab: int, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def calibration_ids(tokenizer, vocab: int, source: str, nsamples: int, seqlen: int, seed: int = 0):
    """`random` = uniform random token ids (works for shapes); anything else is a calib source (needs a
    tokenizer)."""
    if source == "random":
        return random_ids(vocab, nsamples, seqlen, seed)
    if tokenizer is None:
        from rankwise.errors import RankwiseError
        raise RankwiseError("a model given by --shape has no tokenizer: use --calib random")
    from rankwise.calib.data import calibration_set
    return calibration_set(tokenizer, source, nsamples, seqlen, seed).input_ids


class PeakMemory:
    """Peak host RSS and peak GPU allocation over a window (compress/peak_memory.py measures them); `reset()`
    starts a new window."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        reset_peak_memory(self.device)

    def read(self) -> Peaks:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return peak_memory(self.device)


def thread_note() -> str:
    return (f"torch threads={torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}")
