"""Input statistics of a group of Linears (the Linears fed the same tensor: q/k/v, o, gate/up, down) and the one
collector that accumulates them over the calibration batches.

C = X_c^T X_c on the compressed stream (what the layer receives in the model being compressed), sum |x_c|, and,
with a dense stream, G = X_d^T X_c (the same layer's input in the dense model against the compressed one). G is
what the closed-form least-squares fit of the dense layer's outputs W x_d from the compressed inputs x_c needs
(refit, target-aware EoRA); without a dense stream G = C.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.calib.capture import BlockInputs, call_block, in_features

_HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Statistics:
    """Which input statistics to accumulate for every input group.

    xtx:      sum x_c x_c^T on the compressed stream (covariance)
    abs_mean: sum |x_c| (ASVD)
    cross:    sum x_d x_c^T, x_d the same input in the dense model: asking for it keeps a dense stream (a dense
              twin of every block, fed the dense model's hidden states; twice the activation memory)
    """
    xtx: bool = False
    abs_mean: bool = False
    cross: bool = False

    def __or__(self, other: "Statistics") -> "Statistics":
        return Statistics(self.xtx or other.xtx, self.abs_mean or other.abs_mean, self.cross or other.cross)

    @property
    def any(self) -> bool:
        return self.xtx or self.abs_mean or self.cross


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


class InputStats:
    """Running statistics of one input group's input x (n features), accumulated over calibration tokens.

    xtx: sum x_c x_c^T, abs_sum: sum |x_c|, cross: sum x_d x_c^T (None without a dense stream). Each batch's
    product is formed in float32 (fast; a batch is a few thousand tokens; see `gram`) and accumulated in
    float64, so long calibration runs do not lose precision; float64 inputs stay float64. `cache` holds
    quantities derived from these statistics (a Cholesky factor, ...), computed once for the whole group.
    """

    def __init__(self, n: int, device, xtx: bool = True, abs_mean: bool = False, cross: bool = False):
        self.n, self.count = n, 0
        self.cache: dict = {}
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.xtx = zeros(n, n) if xtx or cross else None  # G is read against C
        self.abs_sum = zeros(n) if abs_mean else None
        self.cross = zeros(n, n) if cross else None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as [tokens, n], in its own dtype."""
        return x.reshape(-1, self.n)

    @torch.no_grad()
    def update(self, xc: torch.Tensor, xd: torch.Tensor | None = None) -> None:
        """Add one batch: xc on the compressed stream, xd the same input on the dense stream (with `cross`)."""
        xc = self.rows(xc)
        if self.xtx is not None:
            self.xtx += gram(xc, xc).to(self.xtx.device, torch.float64)
        if self.abs_sum is not None:
            lifted = xc if xc.dtype == torch.float64 else xc.float()
            self.abs_sum += lifted.abs().sum(0).to(self.abs_sum.device, torch.float64)
        if self.cross is not None:
            self.cross += gram(self.rows(xd), xc).to(self.cross.device, torch.float64)
        self.count += xc.shape[0]

    def first_nonfinite(self) -> str | None:
        """The name of the first statistic holding NaN / Inf (overflowing activations), or None."""
        for name, t in (("x^T x", self.xtx), ("sum |x|", self.abs_sum), ("x_d^T x", self.cross)):
            if t is not None and not bool(torch.isfinite(t).all()):
                return name
        return None

    @property
    def covariance(self) -> torch.Tensor:
        """Mean x_c x_c^T over tokens (n x n, float64)."""
        return self.xtx / max(self.count, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def cross_covariance(self) -> torch.Tensor:
        """Mean x_d x_c^T; equals the covariance when the dense and compressed inputs coincide."""
        return self.covariance if self.cross is None else self.cross / max(self.count, 1)


class _Stop(Exception):
    pass


def group_inputs(block: nn.Module, firsts: list[str], hidden, kwargs, device, to_end: bool = False):
    """Run `block` on one batch until every Linear in `firsts` received its input; returns ({name: input},
    the block's output or None). With `to_end` the forward runs to its end and the output is returned."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
            if not to_end and len(seen) == len(firsts):
                raise _Stop
        return hook
    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in firsts]
    out = None
    try:
        out = call_block(block, hidden, kwargs, device)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in firsts if n not in seen]
    if missing:
        raise RuntimeError(f"Linear {missing[0]} was not called by its block's forward")
    return seen, out


@dataclass
class Stream:
    """One stream through a block: the block, its inputs (BlockInputs) and its forward-work shortcuts."""
    block: nn.Module
    inputs: BlockInputs
    shortcuts: object = None  # calib.groups.Shortcuts or None


@torch.no_grad()
def collect_statistics(groups: list[list[str]], index: int, wanted: Statistics, device, storage,
                       stream: Stream, dense: Stream | None = None, propagate: bool = False) -> list[InputStats]:
    """The statistics of each input group's input over all calibration batches, on the compressed stream
    (and the dense one: then with the cross term). One forward per batch and stream, stopped as soon as the
    last group's input exists; with `propagate` it runs to the end and the block's outputs replace its
    inputs (the next block's, for a block that does not change meanwhile). Shortcuts keep each group's input
    and skip finished submodules."""
    block = stream.block
    stats = [InputStats(in_features(block.get_submodule(g[0])), storage, wanted.xtx, wanted.abs_mean,
                        dense is not None) for g in groups]
    firsts = [g[0] for g in groups]
    for b in range(len(stream.inputs.hidden)):
        kwargs = stream.inputs.kwargs[index][b]
        xs = []
        for s in [stream] if dense is None else [stream, dense]:
            with s.shortcuts.at(b) if s.shortcuts is not None else nullcontext():
                seen, out = group_inputs(s.block, firsts, s.inputs.hidden[b], kwargs, device, propagate)
            if s.shortcuts is not None:
                for g in groups:
                    s.shortcuts.keep(g, b, seen[g[0]])
            if propagate:
                s.inputs.hidden[b] = out.to(s.inputs.storage)
            xs.append(seen)
        for g, st in zip(groups, stats):
            st.update(xs[0][g[0]], xs[1][g[0]] if dense is not None else None)
    return stats

