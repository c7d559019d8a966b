"""The block walk: one object that runs a model's decoder blocks, one at a time, on the calibration batch.

llm-compressor style: the inputs of decoder block 0 are captured once (`capture`); then each block is brought
to the device (read from the checkpoint first when a BlockSource streams the weights), its Linears' input
statistics are taken group by group (calib.stats), and its outputs replace the stored hidden states
(`propagate`), so that the next block sees what this one produced. Device memory is one block plus the
calibration activations; with a dense stream, twice (a dense twin of the block, fed the dense model's hidden
states, for statistics that compare the two).

Two walks:
- `compress(wanted, dense_stream, on_group, on_block)`: the caller changes each block while it is walked. The
  groups are visited in forward order; `on_group` gets each group's statistics taken with the earlier groups
  already changed, `on_block` the whole block before it is propagated. Forward work is saved with
  calib.groups.Shortcuts (a finished group's owner submodule is not re-run).
- `unchanged(wanted)`: each block of a model that is not changed, with its Linears' statistics (one forward
  per batch gives the statistics and the next block's inputs); streamed blocks go back to `meta` after.

The walk knows no method or stage: it is told which statistics to take (calib.stats.Statistics) and calls back.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from rankwise.calib.capture import BlockInputs, capture_block_inputs, propagate
from rankwise.calib.groups import Shortcuts, linear_groups, output_owners
from rankwise.calib.stats import InputStats, Statistics, Stream, collect_statistics
from rankwise.errors import RankwiseError

Progress = Callable[[str, int, int], None]


class BlockSource(Protocol):
    """Fills in decoder blocks that start on `meta` (compress.streaming.BlockWeightStream)."""

    def ensure(self, i: int) -> None: ...   # block i's weights on CPU; may start reading block i+1

    def release(self, i: int) -> None: ...  # block i back on meta (it was only read, not changed)


class StageTimer:
    """Wall seconds of every stage that runs: `seconds` in total, `per_block[i]` for the block walk's stages.
    A `listener` (bench/speed.py) is told when each timed stage starts and ends (stage, block or None)."""

    def __init__(self, device: torch.device | None = None, listener=None):
        self.device, self.listener = device, listener
        self.seconds: dict[str, float] = {}
        self.per_block: list[dict[str, float]] = []

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, block: int | None = None):
        if self.listener is not None:
            self.listener.start(name, block)
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            if block is not None:
                while len(self.per_block) <= block:
                    self.per_block.append({})
                self.per_block[block][name] = self.per_block[block].get(name, 0.0) + dt
            if self.listener is not None:
                self.listener.end(name, block, dt)


@dataclass
class BlockStep:
    """One decoder block while the walk holds it on the device. `inputs` / `dense_inputs`: its inputs on the
    compressed / dense stream (None without calibration data / without a dense stream)."""
    index: int
    prefix: str                      # e.g. "model.layers.3"
    block: nn.Module
    linears: dict[str, nn.Module]    # its Linears by local name, as found when the block was entered
    inputs: BlockInputs | None
    dense_block: nn.Module | None
    dense_inputs: BlockInputs | None
    home: torch.device

    def full_name(self, local: str) -> str:
        return f"{self.prefix}.{local}"


OnGroup = Callable[[BlockStep, list[str], "InputStats | None"], None]
OnBlock = Callable[[BlockStep], bool]  # returns whether it changed the block


class BlockRunner:
    """Walks the decoder `blocks` (a ModuleList at `prefix`) of `model` on `calib_ids`; `find_linears(block)`
    names the Linears of a block. Activations and statistics live on `storage` (the CPU with --offload)."""

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList,
                 find_linears: Callable[[nn.Module], dict[str, nn.Module]], calib_ids: torch.Tensor,
                 batch_size: int, device: torch.device, storage: torch.device,
                 block_source: BlockSource | None = None, timer: StageTimer | None = None,
                 progress: Progress | None = None):
        self.model, self.prefix, self.blocks, self.find_linears = model, prefix, blocks, find_linears
        self.calib_ids, self.batch_size, self.device, self.storage = calib_ids, batch_size, device, storage
        self.block_source, self.timer, self.progress = block_source, timer, progress
        self.groups: list[list[str]] | None = None
        self.owners: dict[str, tuple[str, int]] = {}

    def _timed(self, stage: str, block: int | None = None):
        return self.timer.stage(stage, block) if self.timer is not None else nullcontext()

    def capture(self) -> BlockInputs:
        """The hidden states entering block 0 (and every block's keyword arguments)."""
        with self._timed("capture"):
            if self.block_source is not None:
                self.block_source.ensure(0)  # the capture runs block 0 once to learn its return convention
            return capture_block_inputs(self.model, self.blocks, self.calib_ids, self.batch_size, self.device,
                                        self.storage)

    def enter(self, i: int, inputs: BlockInputs | None, dense_inputs: BlockInputs | None) -> BlockStep:
        """Block i on the device (read first when streamed; the next one starts reading), with a dense twin
        when there is a dense stream."""
        block = self.blocks[i]
        if self.block_source is not None:
            self.block_source.ensure(i)
        home = next(block.parameters()).device
        block.to(self.device)
        dense_block = copy.deepcopy(block) if dense_inputs is not None else None
        return BlockStep(i, f"{self.prefix}.{i}", block, self.find_linears(block), inputs, dense_block,
                         dense_inputs, home)

    def leave(self, step: BlockStep, stage: str, release: bool) -> None:
        """The block back where it was (and on `meta` again with `release`); reports progress."""
        step.block.to(step.home)
        if release and self.block_source is not None:
            self.block_source.release(step.index)
        if self.progress:
            self.progress(stage, step.index + 1, len(self.blocks))

    def input_groups(self, step: BlockStep) -> list[list[str]]:
        """The block's Linears by shared input, in forward order, and the submodules a later pass may skip
        (output owners): found on the first block, once per walk (every block has the same forward)."""
        if self.groups is None or {n for g in self.groups for n in g} != set(step.linears):
            with self._timed("groups", step.index):
                args = (step.block, step.linears, step.inputs, step.index, self.device)
                self.groups, self.owners = linear_groups(*args), output_owners(*args)
        return self.groups

    def statistics(self, step: BlockStep, groups: list[list[str]], wanted: Statistics, keep=None,
                   dense_keep=None, propagate: bool = False) -> list[InputStats]:
        """Each group's input statistics (see calib.stats.collect_statistics), refused when not finite."""
        dense = Stream(step.dense_block, step.dense_inputs, dense_keep) if step.dense_block is not None else None
        with self._timed("statistics", step.index):
            stats = collect_statistics(groups, step.index, wanted, self.device, self.storage,
                                       Stream(step.block, step.inputs, keep), dense, propagate)
        for group, st in zip(groups, stats):
            bad = st.first_nonfinite()
            if bad is not None:
                raise RankwiseError(f"the calibration statistics ({bad}) of the input of layer "
                                    f"{step.full_name(group[0])!r} are not finite: its activations overflow "
                                    f"(try --dtype fp32)")
        return stats

    def shortcuts(self, block: nn.Module | None, step: BlockStep) -> Shortcuts | None:
        if block is None:
            return None
        return Shortcuts(block, step.linears, self.owners, len(step.inputs.hidden), self.storage)

    @torch.no_grad()
    def compress(self, wanted: Statistics, dense_stream: bool, on_group: OnGroup, on_block: OnBlock) -> None:
        """Walk every block, letting the caller change it: `on_group(step, group, stats)` for each input group
        in forward order (stats None when none are wanted), then `on_block(step)`, then propagation of the
        changed block's outputs (and the dense twin's). Without statistics or a dense stream there is no
        calibration forward at all: one group of all the block's Linears."""
        reads = wanted.any or dense_stream
        inputs = self.capture() if reads else None
        dense_inputs = None
        if reads and dense_stream:  # second stream: what each block receives in the dense model
            dense_inputs = BlockInputs([h.clone() for h in inputs.hidden], inputs.kwargs, inputs.returns_tuple,
                                       inputs.storage)
        for i in range(len(self.blocks)):
            step = self.enter(i, inputs, dense_inputs)
            groups = self.input_groups(step) if reads else [list(step.linears)]
            keep = self.shortcuts(step.block if wanted.any else None, step)
            dense_keep = self.shortcuts(step.dense_block if wanted.any else None, step)
            for group in groups:
                stats = self.statistics(step, [group], wanted, keep, dense_keep)[0] if wanted.any else None
                on_group(step, group, stats)
                del stats
                for keeper in (keep, dense_keep):
                    if keeper is not None:
                        keeper.finalize(group)  # the group's input is final: a later pass may skip its owner
            if on_block(step):  # the block changed after the kept inputs were taken
                keep = None
            if reads and i + 1 < len(self.blocks):  # the last block's outputs feed nothing
                with self._timed("propagate", i):
                    propagate(step.block, inputs, i, self.device, keep)
                    if step.dense_block is not None:
                        propagate(step.dense_block, dense_inputs, i, self.device, dense_keep)
            del keep, dense_keep
            self.leave(step, "compress", release=False)
            del step

    @torch.no_grad()  # torch applies it to each resumption of the generator
    def unchanged(self, wanted: Statistics, stage: str) -> Iterator[tuple[BlockStep, dict[str, InputStats]]]:
        """For each block of a model that is not being changed: yields (the block on the device, its Linears'
        input statistics by local name; {} when none are wanted: no calibration forward at all). One forward
        per batch takes the statistics and propagates. Streamed blocks are released after."""
        reads = wanted.xtx or wanted.abs_mean
        inputs = self.capture() if reads else None
        for i in range(len(self.blocks)):
            step = self.enter(i, inputs, None)
            stats: dict[str, InputStats] = {}
            if reads:
                groups = self.input_groups(step)
                per_group = self.statistics(step, groups, wanted, propagate=i + 1 < len(self.blocks))
                stats = {name: st for group, st in zip(groups, per_group) for name in group}
                del per_group
            yield step, stats
            del stats
            self.leave(step, stage, release=True)
            del step
