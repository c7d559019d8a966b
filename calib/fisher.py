"""Gradient statistics: the two calibration statistics that need backward passes through the whole model.

- Row Fisher for FWSVD (Hsu et al., ICLR 2022, arXiv:2207.00112): I_ij = sum over calibration sequences of
  (dL/dW_ij)^2, L the causal-LM loss of one sequence; FWSVD uses the row sums d_i^2 = sum_j I_ij.
- Output Fisher diagonal for loss-aware ranks: f_o = sum over calibration tokens of (dL/dy_o)^2, y the
  Linear's output. Under the diagonal empirical Fisher, a change dy of that output costs about
  1/2 sum_o f_o dy_o^2 of loss (the second-order term of the loss around the dense model; the first-order
  term averages out near a minimum), which is what makes output errors of different layers comparable.

Memory is bounded: the model runs one sequence at a time with gradient checkpointing (activations of one
decoder block at a time are kept for backward). For the row Fisher only the targeted weights require
gradients, and each weight's gradient is folded into its sums and freed as soon as it is accumulated
(`register_post_accumulate_grad_hook`), so at most a few gradients of single matrices are alive at once. The
output Fisher needs no weight gradient at all: every weight stays frozen and the input embeddings' output
requires gradients instead (what transformers' `enable_input_require_grads` does), so backward computes only
the activation gradients, about a third less work than with the weights' gradients computed and dropped.
Peak: model weights + one sequence's checkpointed hidden states + the logits of one sequence.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn


def row_fisher(model: nn.Module, input_ids: torch.Tensor, weights: dict[str, torch.Tensor], device,
               transposed: set[str] = frozenset(), progress=None) -> dict[str, torch.Tensor]:
    """Sum over sequences of squared weight gradients, summed over each weight's input dimension.

    weights: name -> the parameter ([out, in]; names in `transposed` are stored [in, out], as GPT-2's Conv1D).
    Returns name -> [out] float64 on CPU. The model is put back where it was, in eval mode, grads off.
    """
    sums = {name: torch.zeros(w.shape[1] if name in transposed else w.shape[0], dtype=torch.float64)
            for name, w in weights.items()}

    def fold(name, grad):
        sums[name] += grad.float().pow(2).sum(0 if name in transposed else 1).double().cpu()

    with backward_mode(model, device, weights, fold):
        _backward_each(model, input_ids, device, "fisher", progress)
    return sums


def output_fisher(model: nn.Module, input_ids: torch.Tensor, linears: dict[str, nn.Module], device,
                  progress=None, sketch: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sum over calibration tokens of the squared loss gradient at each Linear's output (module docstring).

    linears: name -> the module (nn.Linear or Conv1D; the last dimension of its output is `out`).
    Returns name -> [out] float64 on CPU; the model is restored as by `row_fisher`.

    sketch > 0: instead of the diagonal, name -> Z [sketch, out] float32, a Gaussian sketch of the whole output
    Fisher matrix F = sum_t g_t g_t^T (g_t the loss gradient at the Linear's output at token t): Z = R G, R a
    fresh seeded Gaussian [sketch, tokens] / sqrt(sketch) per sequence, so E[Z^T Z] = F and u^T F u is
    estimated by ||Z u||^2 with relative variance 2 / sketch (Johnson-Lindenstrauss; Woodruff 2014,
    "Sketching as a Tool for Numerical Linear Algebra"). sketch x out values per Linear, never out x out."""
    sums: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    mixing: list[torch.Tensor] = []   # the current sequence's R

    def fold(g: torch.Tensor) -> torch.Tensor:
        g = g.reshape(-1, g.shape[-1])
        if not sketch:
            return g.pow(2).sum(0).double().cpu()
        return (mixing[0] @ g).cpu()   # float32: sketch x out per Linear, summed over a few hundred sequences

    def hook_for(name):
        def hook(module, grad_input, grad_output):
            folded = fold(grad_output[0].detach().float())
            sums[name] = sums[name] + folded if name in sums else folded
        return hook

    def next_sequence(ids: torch.Tensor) -> None:
        if sketch:
            draw = torch.randn(sketch, ids.numel(), generator=generator) / sketch ** 0.5   # seeded on the CPU
            mixing[:] = [draw.to(ids.device)]   # moved once per sequence, not once per Linear

    handles = [lin.register_full_backward_hook(hook_for(name)) for name, lin in linears.items()]
    try:
        with backward_mode(model, device, {}, lambda name, grad: None, input_grad=True):
            _backward_each(model, input_ids, device, "output-fisher", progress, next_sequence)
    finally:
        for h in handles:
            h.remove()
    return sums


def _backward_each(model, input_ids, device, stage, progress, before=None) -> None:
    """One causal-LM backward pass per calibration sequence (before(ids) called ahead of each)."""
    for i in range(input_ids.shape[0]):
        ids = input_ids[i:i + 1].to(device)
        if before:
            before(ids)
        with torch.enable_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        if progress:
            progress(stage, i + 1, input_ids.shape[0])


@contextmanager
def on_device(model: nn.Module, device):
    """The model on `device` for the duration; its parameters back where they were after."""
    homes = {id(p): p.data.device for p in model.parameters()}
    try:
        model.to(device)
        yield
    finally:
        for p in model.parameters():
            p.data = p.data.to(homes[id(p)])


@contextmanager
def backward_mode(model: nn.Module, device, weights: dict[str, torch.Tensor],
                  fold: Callable[[str, torch.Tensor], None], input_grad: bool = False):
    """The model on `device` with gradient checkpointing, only `weights` requiring gradients, each gradient
    handed to fold(name, grad) and freed at once; everything put back afterwards. input_grad: the input
    embeddings' output requires gradients (so backward runs with every weight frozen)."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    handles = []

    def hook_for(name):
        def hook(p):
            fold(name, p.grad)
            p.grad = None  # free at once: never hold the whole model's gradients
        return hook

    # transformers 5 renamed gradient checkpointing to activation checkpointing; accept either
    if hasattr(model, "activation_checkpointing_enable"):
        def enable():
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        def enable():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable = None
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    had_ckpt = getattr(model, "is_activation_checkpointing", None)
    had_ckpt = had_ckpt if had_ckpt is not None else getattr(model, "is_gradient_checkpointing", False)
    with on_device(model, device):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for name, w in weights.items():
                w.requires_grad_(True)
                handles.append(w.register_post_accumulate_grad_hook(hook_for(name)))
            if input_grad:
                handles.append(model.get_input_embeddings().register_forward_hook(
                    lambda module, args, output: output.requires_grad_(True)))
            if enable is not None:
                enable()
            model.train()  # transformers checkpoints only in training mode (LLM dropout is 0)
            yield
        finally:
            for h in handles:
                h.remove()
            model.eval()
            if not had_ckpt and disable is not None:
                disable()
            for p in model.parameters():
                p.requires_grad_(flags[id(p)])
                p.grad = None
