"""Group-by-group input statistics of a block's Linears, from the compressed stream and the dense one.

Linears fed the very same tensor form a group (q/k/v, gate/up). Groups are visited in forward order and each
group's statistics are taken with the earlier groups of the same block already changed, so o_proj sees the
attention of the compressed q/k/v and down_proj the compressed MLP input (sequential within the block, as
GPTQ does). Each forward stops as soon as the group's input exists, so a group costs a partial forward.

With a dense twin of the block fed the *dense* model's hidden states, the cross term G = X_d^T X_c gives the
closed-form least-squares fit of the dense layer's outputs W x_d from the compressed inputs x_c: that is what
refit and target-aware EoRA need to correct the error accumulated by earlier layers.

Forward work (`Shortcuts`): once a Linear's input is final (its group's statistics were taken, the earlier
groups are compressed), the submodule whose output *is* that Linear's output (o_proj's attention module,
down_proj's MLP) needs no recomputation: later passes over the block return the Linear applied to the kept
input instead of re-running attention or the MLP's first half.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from rankwise.calib.capture import BlockInputs, LinearStats, _call_block, _in_features, gram


class _Stop(Exception):
    pass


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
        _call_block(block, inputs.hidden[0], inputs.kwargs[block_index][0], device)
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


class PairStats(LinearStats):
    """Input statistics of one group: C = X_c^T X_c (compressed-model inputs), G = X_d^T X_c (dense-model
    inputs against compressed ones; None when there is no dense stream, meaning G = C), sum |x_c|.
    A LinearStats (covariance, abs_mean) plus the cross term, so methods read either."""

    def __init__(self, n: int, want_cross: bool, want_abs: bool, device, want_xtx: bool = True):
        super().__init__(n, want_xtx=want_xtx or want_cross, want_abs=want_abs, device=device)
        self.cross = torch.zeros(n, n, dtype=torch.float64, device=device) if want_cross else None

    @torch.no_grad()
    def update(self, xc: torch.Tensor, xd: torch.Tensor | None = None) -> None:
        super().update(xc)
        if self.cross is not None:
            self.cross += gram(self.rows(xd), self.rows(xc)).to(self.cross.device, torch.float64)

    @property
    def cross_covariance(self) -> torch.Tensor:
        """Mean x_d x_c^T; equals the covariance when the dense and compressed inputs coincide."""
        return self.covariance if self.cross is None else self.cross / max(self.count, 1)


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
        _call_block(block, inputs.hidden[0], inputs.kwargs[block_index][0], device)
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

    `keep(name, b, x)` stores batch b's input of Linear `name`; `finalize(names)` marks Linears as done (their
    group compressed). Inside `active()`, each owner all of whose Linears are final and whose Linear's inputs
    are all kept runs as `Linear(kept input of batch self.batch)` instead of its own forward."""

    def __init__(self, block: nn.Module, linears, owners: dict[str, tuple[str, int]], batches: int, storage):
        self.block, self.linears, self.owners = block, list(linears), owners
        self.batches, self.storage = batches, storage
        self.kept: dict[str, list] = {}
        self.final: set[str] = set()
        self.batch = 0

    def keep(self, name: str, b: int, x: torch.Tensor) -> None:
        if name in self.owners:
            self.kept.setdefault(name, [None] * self.batches)[b] = x.to(self.storage)

    def finalize(self, names) -> None:
        self.final.update(names)

    def _ready(self, name: str) -> bool:
        inside = [n for n in self.linears if n.startswith(self.owners[name][0] + ".")]
        kept = self.kept.get(name)
        return kept is not None and all(x is not None for x in kept) and all(n in self.final for n in inside)

    @contextmanager
    def active(self):
        patched = []
        for name, (owner_name, tuple_len) in self.owners.items():
            if not self._ready(name):
                continue
            owner, linear = self.block.get_submodule(owner_name), self.block.get_submodule(name)

            def skip(*args, _linear=linear, _name=name, _tuple_len=tuple_len, **kwargs):
                x = self.kept[_name][self.batch]
                y = _linear(x.to(next(_linear.parameters()).device))
                return (y,) + (None,) * (_tuple_len - 1) if _tuple_len else y
            owner.forward = skip
            patched.append(owner)
        try:
            yield
        finally:
            for owner in patched:
                del owner.forward


def _input_of(block: nn.Module, name: str, hidden, kwargs, device, shortcuts: Shortcuts | None = None,
              b: int = 0) -> torch.Tensor:
    """Run `block` until Linear `name` receives its input; return that input."""
    if shortcuts is not None:
        shortcuts.batch = b
        with shortcuts.active():
            return _input_of(block, name, hidden, kwargs, device)
    box = []

    def hook(module, args):
        box.append(args[0])
        raise _Stop
    h = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        _call_block(block, hidden, kwargs, device)
    except _Stop:
        pass
    finally:
        h.remove()
    if not box:
        raise RuntimeError(f"Linear {name} was not called by its block's forward")
    return box[0]


@torch.no_grad()
def collect_group_stats(block: nn.Module, group: list[str], inputs: BlockInputs, block_index: int, device,
                        dense_block: nn.Module | None = None, dense_inputs: BlockInputs | None = None,
                        want_abs: bool = False, stats_device=None, want_xtx: bool = True,
                        shortcuts: Shortcuts | None = None, dense_shortcuts: Shortcuts | None = None) -> PairStats:
    """Statistics of the input shared by the Linears of `group`, over all calibration batches. With
    shortcuts, the group's input is kept for later passes and finished submodules are not recomputed."""
    n = _in_features(block.get_submodule(group[0]))
    stats = PairStats(n, dense_block is not None, want_abs, stats_device or device, want_xtx)
    for b, hidden in enumerate(inputs.hidden):
        kw = inputs.kwargs[block_index][b]
        xc = _input_of(block, group[0], hidden, kw, device, shortcuts, b)
        xd = None
        if dense_block is not None:
            xd = _input_of(dense_block, group[0], dense_inputs.hidden[b], kw, device, dense_shortcuts, b)
        for name in group:
            for keeper, x in ((shortcuts, xc), (dense_shortcuts, xd)):
                if keeper is not None and x is not None:
                    keeper.keep(name, b, x)
        stats.update(xc, xd)
    return stats
