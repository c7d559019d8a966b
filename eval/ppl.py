"""Token perplexity by the papers' protocol (GPTQ / SVD-LLM / ASVD tables).

The test split is joined with "\n\n" and tokenized once; it is cut into floor(N / seqlen) non-overlapping
windows (the remainder is dropped); each window is scored on its own and ppl = exp(mean token NLL over all
predicted tokens). With `bos_id`, every window starts with BOS followed by seqlen - 1 text tokens (Gemma
needs this). Windows whose NLL is not finite are counted and reported; ppl is then inf, never a silently
cleaned number (`ppl_finite_windows` gives the value over the finite ones).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from rankwise.errors import RankwiseError
from rankwise.eval.records import PplResult


def make_windows(ids: torch.Tensor, seqlen: int, bos_id: int | None = None,
                 max_windows: int | None = None) -> torch.Tensor:
    """[W, seqlen] non-overlapping windows of a 1-D token tensor."""
    if seqlen < 2:
        raise RankwiseError(f"--seqlen must be at least 2, got {seqlen}")
    body = seqlen - 1 if bos_id is not None else seqlen
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise RankwiseError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * body].view(n, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, device, batch_size: int = 1,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Sum of token NLL per window (float64), each window scored on its own."""
    out = []
    for start in range(0, len(windows), batch_size):
        x = windows[start:start + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(x.shape[0], -1).double().sum(1).cpu())
        if progress:
            progress(min(start + batch_size, len(windows)), len(windows))
    return torch.cat(out)


def perplexity(model, ids: torch.Tensor, seqlen: int, device, batch_size: int = 1, bos_id: int | None = None,
               max_windows: int | None = None, progress=None) -> PplResult:
    windows = make_windows(ids, seqlen, bos_id, max_windows)
    t0 = time.perf_counter()
    nll = window_nll(model, windows, device, batch_size, progress)
    seconds = time.perf_counter() - t0
    per_window = windows.shape[1] - 1
    finite = torch.isfinite(nll)
    n_bad = int((~finite).sum())
    mean_finite = float(nll[finite].sum() / (finite.sum() * per_window)) if finite.any() else float("nan")
    ppl_finite = math.exp(mean_finite) if finite.any() and mean_finite < 700 else float("inf")
    return PplResult(
        ppl=ppl_finite if n_bad == 0 else float("inf"),
        ppl_finite_windows=ppl_finite,
        nll_mean=mean_finite if n_bad == 0 else float("inf"),
        windows=int(len(windows)),
        nonfinite_windows=n_bad,
        tokens_scored=int(finite.sum()) * per_window,
        seqlen=seqlen,
        bos=bos_id is not None,
        seconds=round(seconds, 3),
        tokens_per_second=round(len(windows) * windows.shape[1] / max(seconds, 1e-9), 1),
    )
