"""Autograd through ComfyUI's models, which are built for inference.

ComfyUI runs nodes under ``torch.inference_mode``, so a model a loader node built holds inference tensors, which
autograd refuses to save for a backward pass ("Inference tensors cannot be saved for backward"). Training that
backpropagates through a model (EPD Distill's global objectives, its feature loss) first swaps them for ordinary
copies, as ComfyUI's own training node copies the model it trains. The values are unchanged, so the model samples
as before; the swap is kept (the inference tensors are freed where nothing else holds them). The weights are frozen
(``requires_grad`` off, as ComfyUI's training node freezes its base model): EPD trains the table, whose gradient
reaches the model only through its inputs, so no weight gradient is computed or kept (SD1.5's 860 M weights
would otherwise keep 1.7-3.4 GB of ``.grad`` tensors after the node). Some models have operations with no backward
pass at all (ComfyUI 0.33's Flux rope kernel): :func:`backward_failure` finds out before training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def make_differentiable(module: torch.nn.Module) -> int:
    """Replace ``module``'s inference-mode parameters and buffers by ordinary copies and freeze its parameters;
    returns how many tensors were copied. A no-op without gradients (inside inference mode or ``no_grad``), where
    nothing is saved for backward."""
    if not torch.is_grad_enabled():
        return 0
    module.requires_grad_(False)
    swapped = 0
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_inference():
                    continue
                copy = tensor.clone()
                if isinstance(tensor, torch.nn.Parameter):
                    copy = torch.nn.Parameter(copy, requires_grad=False)
                store[name] = copy
                swapped += 1
    return swapped


def saved_copies() -> torch.autograd.graph.saved_tensors_hooks:
    """Autograd keeps copies of the tensors it saves for backward: ComfyUI's CLIP layers add their residuals in
    place (``x += ...``) into tensors a layer norm saved, which would fail the backward pass."""
    return torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved)


def backward_failure(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                     sigma: torch.Tensor) -> str | None:  # fmt: skip
    """Why gradients cannot flow through ``denoiser`` (the first line of its error), or None when they can.

    One call on ``x`` at ``sigma``, backpropagated. A failure counts only where the model itself works: an error the
    call raises without gradients too, or running out of memory, is not an answer and propagates.
    """
    x = x.detach().requires_grad_(True)
    try:
        denoiser(x, sigma).float().square().mean().backward()
        return None
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        with torch.no_grad():
            denoiser(x.detach(), sigma)  # the model fails without gradients too: that error, not a fallback
        return str(error).split("\n")[0][:200]
