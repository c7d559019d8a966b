"""Empirical Fisher row importance for FWSVD (Hsu et al., ICLR 2022, arXiv:2207.00112).

I_ij = sum over calibration sequences of (dL/dW_ij)^2, with L the causal-LM loss of one sequence; FWSVD uses
the row sums d_i^2 = sum_j I_ij. This is the one statistic that needs backward passes through the whole
model. Memory is bounded: the model runs one sequence at a time with gradient checkpointing (activations of
one decoder block at a time are kept for backward), only the targeted weights require gradients, and each
weight's gradient is folded into its row sums and freed as soon as it is accumulated
(`register_post_accumulate_grad_hook`), so at most a few gradients of single matrices are alive at once.
Peak: model weights + one sequence's checkpointed hidden states + the logits of one sequence.
"""
from __future__ import annotations

import torch
from torch import nn


def row_fisher(model: nn.Module, input_ids: torch.Tensor, weights: dict[str, torch.Tensor], device,
               transposed: set[str] = frozenset(), progress=None) -> dict[str, torch.Tensor]:
    """Sum over sequences of squared weight gradients, summed over each weight's input dimension.

    weights: name -> the parameter ([out, in]; names in `transposed` are stored [in, out], as GPT-2's Conv1D).
    Returns name -> [out] float64 on CPU. The model is put back where it was, in eval mode, grads off.
    """
    homes = {id(p): p.data.device for p in model.parameters()}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    sums = {name: torch.zeros(w.shape[1] if name in transposed else w.shape[0], dtype=torch.float64)
            for name, w in weights.items()}
    handles = []

    def hook_for(name):
        def hook(p):
            g = p.grad.float()
            sums[name] += g.pow(2).sum(0 if name in transposed else 1).double().cpu()
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
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook_for(name)))
        if enable is not None:
            enable()
        model.train()  # transformers checkpoints only in training mode (LLM dropout is 0)
        for i in range(input_ids.shape[0]):
            ids = input_ids[i:i + 1].to(device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            if progress:
                progress("fisher", i + 1, input_ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.eval()
        if not had_ckpt and disable is not None:
            disable()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
            p.data = p.data.to(homes[id(p)])
    return sums
