"""scikit-learn's bundled digits for the demo digits model: training, its tests and the accuracy benchmark.

scikit-learn is a development requirement (requirements-dev.txt); the product never imports it.
"""

from __future__ import annotations

import torch

from . import comfy_harness


def training_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (no download) as latents ``[1797, 4, 8, 8]`` and their labels ``[1797]``,
    through the pack's ``digits_to_latent`` (starts ComfyUI in-process if it is not yet)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    dm = comfy_harness.pack_module("nodes.digits_model")
    return dm.digits_to_latent(torch.from_numpy(data.images)), torch.from_numpy(data.target)
