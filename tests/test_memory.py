"""Peak memory of the block-sequential pipeline does not grow with the number of blocks.

On CPU the compute device and the model's home are the same, so RSS cannot tell "one block on the device"
from "all blocks". The test counts instead the bytes of every tensor storage *created while the pipeline
runs* (a TorchDispatchMode sees each op's outputs; a storage weak reference says when it is freed). The
model's own weights are excluded, and so are the factors of a block once the pipeline has finished it (on a
GPU, `block.to(home)` moves them off the device at that point). What remains is the pipeline's working set:
calibration activations, statistics, decomposition temporaries. It must not depend on the block count.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import rankwise.compress.pipeline as pipeline
from rankwise.compress.config import CompressConfig
from tiny import tiny_model


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated by ops run under this mode (minus `exclude`d ones)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.excluded: set[int] = set()
        self.current = self.peak = 0

    def exclude(self, tensors) -> None:
        for t in tensors:
            key = StorageWeakRef(t.untyped_storage()).cdata
            self.excluded.add(key)
            if key in self.live:
                self.current -= self.live.pop(key)[1]

    def _sweep(self) -> None:
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in self.excluded:
                    n = t.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, n)
                    self.current += n
        if self.current > self.peak:  # freed storages are only counted out when they could set a new peak
            self._sweep()
            self.peak = max(self.peak, self.current)
        return out


def pipeline_peak(layers: int, leak_stats: bool = False, **options) -> tuple[int, int]:
    """(peak working bytes, one block's weight bytes) of compressing a tiny Llama with `layers` blocks."""
    model = tiny_model("llama", layers=layers)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    calib = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(model="tiny", method="svd-llm", ratio=0.4, nsamples=8, seqlen=32, batch_size=4,
                         device="cpu", **options)
    tracker = LiveBytes()
    tracker.exclude([*model.parameters(), *model.buffers(), calib])
    kept = []
    original = pipeline.collect_group_stats
    if leak_stats:  # a pipeline that forgot to free each block's statistics
        def leaky(*args, **kwargs):
            stats = original(*args, **kwargs)
            kept.append(stats)
            return stats
        pipeline.collect_group_stats = leaky

    def progress(phase, done, total):  # a finished block's factors go back home (off the device)
        tracker.exclude(model.parameters())
    try:
        with tracker:
            pipeline.compress_model(model, calib, cfg, progress)
    finally:
        pipeline.collect_group_stats = original
    return tracker.peak, block_bytes


def test_peak_memory_does_not_grow_with_blocks():
    peak2, block_bytes = pipeline_peak(2)
    peak8, _ = pipeline_peak(8)
    assert peak2 > 0
    assert abs(peak8 - peak2) < block_bytes, (peak2, peak8, block_bytes)


def test_peak_memory_with_block_refinement_does_not_grow_with_blocks():
    peak2, block_bytes = pipeline_peak(2, refine=True, refine_steps=2)
    peak8, _ = pipeline_peak(8, refine=True, refine_steps=2)
    assert abs(peak8 - peak2) < block_bytes, (peak2, peak8, block_bytes)


def test_memory_probe_catches_statistics_kept_for_every_block():
    peak2, block_bytes = pipeline_peak(2, leak_stats=True)
    peak8, _ = pipeline_peak(8, leak_stats=True)
    assert peak8 - peak2 > block_bytes, (peak2, peak8, block_bytes)
