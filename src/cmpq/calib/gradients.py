"""How much the loss cares about each linear's outputs: the square of the
next-token loss's gradient at them, averaged over tokens weighted by their input
energy (a diagonal Fisher, one number per linear).

A rounding error ``ΔW`` in a linear moves token ``t``'s output by ``ΔW x_t``; to
second order the loss grows by about ``½ Σ_t ‖g_t‖² ‖ΔW x_t‖² / out`` where
``g_t`` is the loss's gradient at that output (the empirical Fisher standing in
for the Hessian, its cross terms dropped), and ``‖ΔW x_t‖²`` scales with
``‖x_t‖²``. The activation-weighted distortions the allocation measures are
``E[‖ΔW x‖²]``; multiplied by this number they are priced in the loss itself,
so bits can be traded between layers (``allocation`` rd-fisher).

It needs the whole model in memory: one forward and backward pass a window,
with no weight gradients kept.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.graph import quantizable_linears


def output_gradient_energy(
    model: nn.Module, windows: torch.Tensor, progress: bool = True
) -> dict[str, float]:
    """Per quantizable linear (by full name), the squared gradient of each window's
    mean next-token loss at the linear's output, per output feature, averaged over
    the tokens weighted by each token's input energy ``‖x_t‖²``:
    ``Σ_t ‖g_t‖² ‖x_t‖² / (out_features · Σ_t ‖x_t‖²)``.

    The weighting is what the estimate needs: a rounding error moves token ``t``'s
    output by ``ΔW x_t``, in proportion to ``‖x_t‖``, so tokens with quiet inputs
    (whose gradients behind a norm can be huge) add little. Unweighted, gemma3-270m's
    ``down_proj`` weights came out about 60x larger and the trade starved the other
    layers (docs/decisions.md).

    ``windows`` is ``[n, seqlen]`` token ids. The model's parameters are left as
    they were (no gradients stored, ``requires_grad`` restored).
    """
    linears = quantizable_linears(model)
    weighted = {name: torch.zeros((), dtype=torch.float64) for name in linears}
    energy = {name: torch.zeros((), dtype=torch.float64) for name in linears}
    counts = dict.fromkeys(linears, 0)

    def hook_for(name: str):
        def on_forward(_module, inputs, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            token_energy = inputs[0].detach().double().square().sum(-1)

            def add(gradient: torch.Tensor) -> None:
                per_token = gradient.detach().double().square().sum(-1)
                weighted[name] += (per_token * token_energy).sum().cpu()
                energy[name] += token_energy.sum().cpu() * gradient.shape[-1]
                counts[name] += gradient.numel()

            output.register_hook(add)

        return on_forward

    def input_needs_gradient(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)  # the only leaf the backward starts from

    handles = [module.register_forward_hook(hook_for(name)) for name, module in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(input_needs_gradient))
    needed = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    device = next(model.parameters()).device
    try:
        for window in tqdm(windows, desc="loss gradients", unit="window", disable=not progress):
            ids = window.unsqueeze(0).to(device)
            model(ids, labels=ids).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(model.parameters(), needed, strict=True):
            parameter.requires_grad_(flag)
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[0]} (and {len(missing) - 1} more)")
    return {name: (weighted[name] / energy[name].clamp_min(1e-300)).item() for name in linears}
