"""Input groups of a block's Linears, and the forward-work shortcuts.

Linears fed the very same tensor form an input group (q/k/v, o, gate/up, down), listed in the order the
block's forward calls them (`linear_groups`). The block walk (calib.runner) takes each group's statistics
with the earlier groups of the same block already changed, so o_proj sees the attention of the compressed
q/k/v and down_proj the compressed MLP input (sequential within the block, as GPTQ does).

Forward work (`Shortcuts`): once a Linear's input is final (its group's statistics were taken, the earlier
groups are compressed), the submodule whose output *is* that Linear's output (o_proj's attention module,
down_proj's MLP) needs no recomputation: later passes over the block return the Linear applied to the kept
input instead of re-running attention or the MLP's first half.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from rankwise.calib.capture import BlockInputs, call_block


@torch.no_grad()
def linear_groups(block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs, block_index: int,
                  device) -> list[list[str]]:
    """Names of the block's Linears grouped by shared input tensor, in the order the forward calls them."""
    seen: list[tuple[str, torch.Tensor]] = []

    def hook_for(name):
        def hook(module, args):
            seen.append((name, args[0]))
        return hook
    handles = [lin.register_forward_pre_hook(hook_for(n)) for n, lin in linears.items()]
    try:
        call_block(block, inputs.hidden[0], inputs.kwargs[block_index][0], device)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    keys: list[torch.Tensor] = []
    for name, x in seen:
        if any(name in g for g in groups):
            continue
        for g, key in zip(groups, keys):
            if key is x or (key.data_ptr() == x.data_ptr() and key.shape == x.shape):
                g.append(name)
                break
        else:
            groups.append([name])
            keys.append(x)
    missing = [n for n in linears if not any(n in g for g in groups)]
    return groups + [[n] for n in missing]  # Linears the forward never called still get compressed


@torch.no_grad()
def output_owners(block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs, block_index: int,
                  device) -> dict[str, tuple[str, int]]:
    """Linear name -> (the outermost submodule of the block whose output is that very Linear's output, the
    length of that output if it is a tuple else 0): o_proj -> self_attn, down_proj -> mlp; found on one
    forward. A tuple counts when its first element is the Linear's output and the others are None. Only
    Linears and submodules called once qualify."""
    outputs: dict[str, list] = {}

    def hook_for(name):
        def hook(module, args, out):
            outputs.setdefault(name, []).append(out)
        return hook
    handles = [m.register_forward_hook(hook_for(n)) for n, m in block.named_modules() if n]
    try:
        call_block(block, inputs.hidden[0], inputs.kwargs[block_index][0], device)
    finally:
        for h in handles:
            h.remove()

    def first(out):
        if isinstance(out, tuple) and out and all(o is None for o in out[1:]):
            return out[0]
        return out
    owners = {}
    for lin in linears:
        if len(outputs.get(lin, [])) != 1:
            continue
        y = outputs[lin][0]
        candidates = [n for n, outs in outputs.items() if n != lin and lin.startswith(n + ".") and len(outs) == 1
                      and first(outs[0]) is y]
        if candidates:
            owner = min(candidates, key=len)  # the outermost
            out = outputs[owner][0]
            owners[lin] = (owner, len(out) if isinstance(out, tuple) else 0)
    return owners


class Shortcuts:
    """Kept inputs of Linears whose owner submodule (output_owners) can be skipped once the input is final.

    `keep(group, b, x)` stores batch b's input of the group's Linears; `finalize(group)` marks them as done
    (the group compressed). Inside `at(b)`, each owner all of whose Linears are final and whose Linear's
    inputs are all kept runs as `Linear(kept input of batch b)` instead of its own forward."""

    def __init__(self, block: nn.Module, linears, owners: dict[str, tuple[str, int]], batches: int, storage):
        self.block, self.linears, self.owners = block, list(linears), owners
        self.batches, self.storage = batches, storage
        self.kept: dict[str, list] = {}
        self.final: set[str] = set()

    def keep(self, group: list[str], b: int, x: torch.Tensor) -> None:
        for name in group:
            if name in self.owners:
                self.kept.setdefault(name, [None] * self.batches)[b] = x.to(self.storage)

    def finalize(self, group: list[str]) -> None:
        self.final.update(group)

    def _ready(self, name: str) -> bool:
        inside = [n for n in self.linears if n.startswith(self.owners[name][0] + ".")]
        kept = self.kept.get(name)
        return kept is not None and all(x is not None for x in kept) and all(n in self.final for n in inside)

    @contextmanager
    def at(self, b: int):
        """Batch b's forward with every ready owner replaced by its Linear on the kept input."""
        patched = []
        for name, (owner_name, tuple_len) in self.owners.items():
            if not self._ready(name):
                continue
            owner, linear = self.block.get_submodule(owner_name), self.block.get_submodule(name)

            def skip(*args, _linear=linear, _x=self.kept[name][b], _tuple_len=tuple_len, **kwargs):
                y = _linear(_x.to(next(_linear.parameters()).device))
                return (y,) + (None,) * (_tuple_len - 1) if _tuple_len else y
            owner.forward = skip
            patched.append(owner)
        try:
            yield
        finally:
            for owner in patched:
                del owner.forward
