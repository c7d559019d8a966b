"""Group-by-group input statistics of a block's Linears, from the compressed stream and the dense one.

Linears fed the very same tensor form a group (q/k/v, gate/up). Groups are visited in forward order and each
group's statistics are taken with the earlier groups of the same block already changed, so o_proj sees the
attention of the compressed q/k/v and down_proj the compressed MLP input (sequential within the block, as
GPTQ does). Each forward stops as soon as the group's input exists, so a group costs a partial forward.

With a dense twin of the block fed the *dense* model's hidden states, the cross term G = X_d^T X_c gives the
closed-form least-squares fit of the dense layer's outputs W x_d from the compressed inputs x_c: that is what
refit and target-aware EoRA need to correct the error accumulated by earlier layers.
"""
from __future__ import annotations

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


def _input_of(block: nn.Module, name: str, hidden, kwargs, device) -> torch.Tensor:
    """Run `block` until Linear `name` receives its input; return that input."""
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
                        want_abs: bool = False, stats_device=None, want_xtx: bool = True) -> PairStats:
    """Statistics of the input shared by the Linears of `group`, over all calibration batches."""
    n = _in_features(block.get_submodule(group[0]))
    stats = PairStats(n, dense_block is not None, want_abs, stats_device or device, want_xtx)
    for b, hidden in enumerate(inputs.hidden):
        kw = inputs.kwargs[block_index][b]
        xc = _input_of(block, group[0], hidden, kw, device)
        xd = None
        if dense_block is not None:
            xd = _input_of(dense_block, group[0], dense_inputs.hidden[b], kw, device)
        stats.update(xc, xd)
    return stats
