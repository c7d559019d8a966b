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

from rankwise.compress.config import CompressConfig
from rankwise.compress.pipeline import compress_model
from rankwise.compress.stages.base import Corrector, register_corrector
from rankwise.compress.stages.recipe import Recipe
from tiny import tiny_model


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated by ops run under this mode (minus `exclude`d ones)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.excluded: dict[int, StorageWeakRef] = {}
        self.current = self.peak = 0

    def exclude(self, tensors) -> None:
        for t in tensors:
            ref = StorageWeakRef(t.untyped_storage())
            self.excluded[ref.cdata] = ref
            if ref.cdata in self.live:
                self.current -= self.live.pop(ref.cdata)[1]

    def _sweep(self) -> None:
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= n

    def _known(self, key: int) -> bool:
        """Counted or excluded already: the same address may be a new storage once the old one was freed."""
        return any(key in where and not (where[key][0] if where is self.live else where[key]).expired()
                   for where in (self.live, self.excluded))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not self._known(StorageWeakRef(t.untyped_storage()).cdata):
                ref = StorageWeakRef(t.untyped_storage())
                self.current -= self.live.pop(ref.cdata, (None, 0))[1]  # a freed storage at the same address
                self.excluded.pop(ref.cdata, None)
                self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                self.current += self.live[ref.cdata][1]
        if self.current > self.peak:  # freed storages are only counted out when they could set a new peak
            self._sweep()
            self.peak = max(self.peak, self.current)
        return out


@register_corrector("test-keep-statistics")
class KeepStatistics(Corrector):
    """What a walk that never freed a block's statistics would hold: keeps every group's statistics object."""

    def __init__(self, options=None):
        super().__init__(options)
        self.kept = []

    def after_factorize(self, work):
        self.kept.append(work.stats.group)


def pipeline_peak(layers: int, leak_stats: bool = False, **options) -> tuple[int, int, int]:
    """(peak working bytes, one block's weight bytes, bytes of one block's statistics kept with `leak_stats`)
    of compressing a tiny Llama with `layers` blocks."""
    model = tiny_model("llama", layers=layers)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    calib = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(model="tiny", method="svd-llm", ratio=0.4, nsamples=8, seqlen=32, batch_size=4,
                         device="cpu", **options)
    recipe = Recipe.from_config(cfg.with_stages([{"stage": "test-keep-statistics"}]) if leak_stats else cfg)
    tracker = LiveBytes()
    tracker.exclude([*model.parameters(), *model.buffers(), calib])

    def progress(phase, done, total):  # a finished block's factors go back home (off the device)
        tracker.exclude(model.parameters())
    with tracker:
        compress_model(model, calib, cfg, progress, recipe=recipe)
    kept = recipe.correctors[0].kept if leak_stats else []
    return tracker.peak, block_bytes, tensor_bytes(kept[:7])  # the first block's 7 Linears


def tensor_bytes(stats) -> int:
    """Bytes of the distinct tensor storages held by these statistics objects (their sums and cache)."""
    storages = {}
    for st in stats:
        for t in pytree.tree_leaves([st.xtx, st.abs_sum, st.cross, list(st.cache.values())]):
            if isinstance(t, torch.Tensor):
                storages[StorageWeakRef(t.untyped_storage()).cdata] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_peak_memory_does_not_grow_with_blocks():
    peak2, block_bytes, _ = pipeline_peak(2)
    peak8, _, _ = pipeline_peak(8)
    config = tiny_model("llama", layers=1).config
    hidden_states = 8 * 32 * config.hidden_size * 4  # float32 calibration activations, always held
    down_xtx = config.intermediate_size ** 2 * 8     # the largest group's X^T X (float64)
    assert peak2 > hidden_states + down_xtx, (peak2, hidden_states, down_xtx)
    assert abs(peak8 - peak2) < block_bytes, (peak2, peak8, block_bytes)


def test_peak_memory_with_block_refinement_does_not_grow_with_blocks():
    peak2, block_bytes, _ = pipeline_peak(2, refine=True, refine_steps=2)
    peak8, _, _ = pipeline_peak(8, refine=True, refine_steps=2)
    assert abs(peak8 - peak2) < block_bytes, (peak2, peak8, block_bytes)


def test_peak_memory_with_held_out_refinement_does_not_grow_with_blocks():
    options = {"steps": 6, "holdout": 0.5, "patience": 1, "eval_every": 1, "norms": True, "clip": 1.0,
               "weight_decay": 0.01}
    recipe = [{"stage": "svd-llm"}, {"stage": "block-refine", "options": options}]
    peak2, block_bytes, _ = pipeline_peak(2, recipe=recipe)
    peak8, _, _ = pipeline_peak(8, recipe=recipe)
    assert abs(peak8 - peak2) < block_bytes, (peak2, peak8, block_bytes)


def test_memory_probe_catches_statistics_kept_for_every_block():
    """Statistics kept for every block: the peak grows by what six more blocks' statistics hold."""
    peak2, block_bytes, per_block = pipeline_peak(2, leak_stats=True)
    peak8, _, _ = pipeline_peak(8, leak_stats=True)
    assert per_block > block_bytes
    assert abs((peak8 - peak2) - 6 * per_block) < block_bytes, (peak2, peak8, per_block, block_bytes)
