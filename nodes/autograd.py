"""Autograd through ComfyUI's models, which are built for inference.

ComfyUI runs nodes under ``torch.inference_mode``, so a model a loader node built holds inference tensors, which
autograd refuses to save for a backward pass ("Inference tensors cannot be saved for backward"). Training that
backpropagates through a model (EPD Distill's global objectives, its feature loss) first swaps them for ordinary
copies, as ComfyUI's own training node copies the model it trains. The values are unchanged, so the model samples
as before; the swap is kept (the inference tensors are freed where nothing else holds them).
"""

from __future__ import annotations

import torch


def make_differentiable(module: torch.nn.Module) -> int:
    """Replace ``module``'s inference-mode parameters and buffers by ordinary copies; returns how many. A no-op
    without gradients (inside inference mode or ``no_grad``), where nothing is saved for backward."""
    if not torch.is_grad_enabled():
        return 0
    swapped = 0
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_inference():
                    continue
                copy = tensor.clone()
                if isinstance(tensor, torch.nn.Parameter):
                    copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
                store[name] = copy
                swapped += 1
    return swapped


def saved_copies():
    """Autograd keeps copies of the tensors it saves for backward: ComfyUI's CLIP layers add their residuals in
    place (``x += ...``) into tensors a layer norm saved, which would fail the backward pass."""
    return torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved)
