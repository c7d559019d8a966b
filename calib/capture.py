"""What enters each decoder block on the calibration batch, and running a block on it.

The block walk (calib.runner, llm-compressor / GPTQ style) never runs the whole model on the calibration
batch: it captures what enters decoder block 0 once, then runs one block at a time on the stored hidden
states, and replaces them by the block's outputs (`propagate`) so that the next block sees what the (possibly
changed) block produced. Memory on the device is one block plus the calibration activations.
"""
from __future__ import annotations

from contextlib import nullcontext
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


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    kwargs = _move(kwargs, device)
    args = kwargs.pop("__args__", ())
    out = block(hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def in_features(layer: nn.Module) -> int:
    """A Linear's input width (nn.Linear or transformers' Conv1D)."""
    if hasattr(layer, "in_features"):
        return layer.in_features
    return layer.weight.shape[0]  # transformers' Conv1D stores weight as [in, out]


@torch.no_grad()
def propagate(block: nn.Module, inputs: BlockInputs, block_index: int, device, shortcuts=None) -> None:
    """Replace the stored hidden states by this block's outputs (the next block's inputs), in place.
    shortcuts (calib.groups.Shortcuts): submodules whose output is already known are not recomputed."""
    for b, hidden in enumerate(inputs.hidden):
        with shortcuts.at(b) if shortcuts is not None else nullcontext():
            inputs.hidden[b] = call_block(block, hidden, inputs.kwargs[block_index][b], device).to(inputs.storage)
