"""Block inputs and per-Linear input statistics for the block-sequential pipeline.

The pipeline (llm-compressor / GPTQ style) never runs the whole model on the calibration batch: it captures
what enters decoder block 0 once, then for each block accumulates statistics of every Linear's input, lets
the caller change the block, and re-runs the block so that the next block sees the *changed* outputs.
Memory on the device is one block plus the calibration activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering the current block (one tensor per batch) and each block's extra kwargs.

    kwargs[i][b] are block i's keyword arguments for batch b (attention mask, rotary tables, ...): they
    depend on positions only, never on hidden content, so they are recorded once for all blocks. Tensors
    shared between blocks (one mask object for all layers) are stored once.
    """
    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]
    returns_tuple: bool
    storage: torch.device

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records its kwargs and passes the hidden state on."""

    def __init__(self, index: int, last: int, block: nn.Module, sink: "_Sink"):
        super().__init__()
        self.index, self.last, self.block, self.sink = index, last, block, sink

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                                "use_cache", "output_attentions")}
        if args:  # older families pass the mask positionally; keep it under a private name
            kwargs["__args__"] = args
        self.sink.kwargs[self.index].append(kwargs)
        if self.index == 0:
            self.sink.hidden.append(hidden_states.to(self.sink.storage))
            if self.sink.returns_tuple is None:  # learn the block's return convention once
                out = self.block(hidden_states, *args, **kwargs)
                self.sink.returns_tuple = isinstance(out, tuple)
        if self.index == self.last:
            raise _StopForward
        return (hidden_states,) if self.sink.returns_tuple else hidden_states


@dataclass
class _Sink:
    n: int
    storage: torch.device
    hidden: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)
    returns_tuple: bool | None = None


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device, storage: torch.device) -> BlockInputs:
    """Run the embeddings once per batch and record what every decoder block receives.

    Everything but the blocks is moved to `device` for this pass and back to where it was afterwards.
    """
    sink = _Sink(len(blocks), storage)
    sink.kwargs = [[] for _ in blocks]
    originals = list(blocks)
    block_ids = {id(p) for b in originals for p in b.parameters()}
    others = [(p, p.data.device) for p in model.parameters() if id(p) not in block_ids]
    buffers = [(b, b.data.device) for name, b in model.named_buffers()]
    for p, _ in others:
        p.data = p.data.to(device)
    for b, _ in buffers:
        b.data = b.data.to(device)
    block0_home = next(originals[0].parameters()).device
    originals[0].to(device)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Recorder(i, len(blocks) - 1, originals[i], sink)
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        for p, dev in others:
            p.data = p.data.to(dev)
        for b, dev in buffers:
            b.data = b.data.to(dev)
        originals[0].to(block0_home)
    # Store each distinct kwargs tensor once on the storage device (all layers usually share one mask).
    seen: dict[int, object] = {}

    def dedup(obj):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen[id(obj)] = obj.to(storage)
            return seen[id(obj)]
        if isinstance(obj, (tuple, list)):
            return type(obj)(dedup(o) for o in obj)
        if isinstance(obj, dict):
            return {k: dedup(v) for k, v in obj.items()}
        return obj
    kwargs = [[dedup(kw) for kw in per_block] for per_block in sink.kwargs]
    return BlockInputs(sink.hidden, kwargs, bool(sink.returns_tuple), storage)


def _call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    kwargs = _move(kwargs, device)
    args = kwargs.pop("__args__", ())
    out = block(hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


_HALF = (torch.bfloat16, torch.float16)


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b for [tokens, n] activations, in float32 (float64 inputs stay float64).

    bf16/fp16 activations have at most 11 significant bits, so each product is exact in float32: on a GPU a
    half-precision GEMM that accumulates and writes float32 (tensor cores) then equals the float32 GEMM of
    the upcast inputs, at several times its speed and without the upcast copies.
    """
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
        try:
            return torch.mm(a.T, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch or GPU without the mixed-output GEMM: upcast below
            pass
    lift = (lambda t: t) if a.dtype == torch.float64 else (lambda t: t.float())
    return lift(a).T @ lift(b)


class LinearStats:
    """Running statistics of one Linear's input x (n features), accumulated over calibration tokens.

    xtx: sum of x x^T (SVD-LLM / EoRA covariance), abs_sum: sum of |x| (ASVD). Each batch's product is
    formed in float32 (fast; a batch is a few thousand tokens; see `gram`) and accumulated in float64, so
    long calibration runs do not lose precision. float64 inputs (tests) stay float64.
    """

    def __init__(self, n: int, want_xtx: bool, want_abs: bool, device):
        self.n, self.count = n, 0
        self.cache: dict = {}  # quantities derived from these statistics (a Cholesky factor, ...), once each
        self.xtx = torch.zeros(n, n, dtype=torch.float64, device=device) if want_xtx else None
        self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device) if want_abs else None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as [tokens, n], in its own dtype."""
        return x.reshape(-1, self.n)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = self.rows(x)
        if self.xtx is not None:
            self.xtx += gram(x, x).to(self.xtx.device, torch.float64)
        if self.abs_sum is not None:
            lifted = x if x.dtype == torch.float64 else x.float()
            self.abs_sum += lifted.abs().sum(0).to(self.abs_sum.device, torch.float64)
        self.count += x.shape[0]

    def first_nonfinite(self) -> str | None:
        """The name of the first statistic holding NaN / Inf (overflowing activations), or None."""
        for name, t in (("x^T x", self.xtx), ("sum |x|", self.abs_sum)):
            if t is not None and not bool(torch.isfinite(t).all()):
                return name
        return None

    @property
    def covariance(self) -> torch.Tensor:
        """Mean x x^T over tokens (n x n, float64)."""
        return self.xtx / max(self.count, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


@torch.no_grad()
def collect_linear_stats(block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs, block_index: int,
                         device, want_xtx: bool = True, want_abs: bool = False,
                         stats_device=None) -> dict[str, LinearStats]:
    """Run the block over the calibration batch and accumulate every listed Linear's input statistics.

    Linears fed the very same tensor (q/k/v, gate/up) share one LinearStats object: X^T X is formed once.
    """
    stats_device = stats_device or device
    stats: dict[str, LinearStats] = {}
    owners: set[str] = set()
    # First batch only: input tensor -> first Linear that saw it. The tensor is kept alive in the value so
    # that its memory cannot be reused by a later, different activation of the same shape.
    first_seen: dict[tuple, tuple[str, torch.Tensor]] = {}

    def hook_for(name: str, n: int):
        def hook(module, args):
            x = args[0]
            if name not in stats:
                key = (x.device, x.data_ptr(), tuple(x.shape))
                if key in first_seen:
                    stats[name] = stats[first_seen[key][0]]
                    return
                first_seen[key] = (name, x)
                stats[name] = LinearStats(n, want_xtx, want_abs, stats_device)
                owners.add(name)
            if name in owners:
                stats[name].update(x)
        return hook

    handles = [lin.register_forward_pre_hook(hook_for(name, _in_features(lin))) for name, lin in linears.items()]
    try:
        for b, hidden in enumerate(inputs.hidden):
            _call_block(block, hidden, inputs.kwargs[block_index][b], device)
            first_seen.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def _in_features(layer: nn.Module) -> int:
    if hasattr(layer, "in_features"):
        return layer.in_features
    return layer.weight.shape[0]  # transformers' Conv1D stores weight as [in, out]


@torch.no_grad()
def propagate(block: nn.Module, inputs: BlockInputs, block_index: int, device) -> None:
    """Replace the stored hidden states by this block's outputs (the next block's inputs), in place."""
    for b, hidden in enumerate(inputs.hidden):
        inputs.hidden[b] = _call_block(block, hidden, inputs.kwargs[block_index][b], device).to(inputs.storage)
