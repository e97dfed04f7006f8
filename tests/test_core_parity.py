"""The core reproduces the authors' trajectories on the exact Gaussian-mixture denoiser."""

from __future__ import annotations

import pytest
import torch
from conftest import REFERENCE, official_path, reference_files, reference_meta
from safetensors.torch import load_file

from epd_core import GaussianMixture, load_params, make_schedule, sample

REFS = reference_files()


def _setup(path):
    meta = reference_meta(path)
    ref = load_file(str(path))
    params = load_params(official_path(meta["predictor_file"]))
    overrides = {}
    if meta["net_kind"] == "edm":
        overrides = {"sigma_min": meta["sigma_min"], "sigma_max": meta["sigma_max"]}
    grid = make_schedule(params, **overrides)
    gm = GaussianMixture.reference()
    flow = meta["net_kind"] in ("sd3", "flux")
    denoiser = gm.denoise_flow if flow else gm.denoise_ve
    x = ref["latents"] if flow else ref["latents"] * grid[0]
    return meta, ref, params, grid, denoiser, x


def _trajectory(denoiser, x, grid, params, **kw):
    xs = []
    out = sample(denoiser, x, grid, params, callback=lambda info: xs.append(info["x"]), **kw)
    return torch.stack(xs + [out])


def test_reference_set_is_complete():
    assert len(REFS) == 13
    gmm = load_file(str(REFERENCE / "gmm.safetensors"))
    gm = GaussianMixture.reference()
    assert torch.equal(gmm["means"], gm.means)
    # softmax of the same logits: equal up to the last bit, which depends on the CPU's vector kernels
    assert torch.allclose(gmm["weights"], gm.weights, rtol=4 * torch.finfo(torch.float64).eps, atol=0)
    assert float(gmm["std"]) == gm.std


@pytest.mark.parametrize("path", REFS, ids=lambda p: p.stem)
def test_schedule_matches(path):
    meta, ref, params, grid, *_ = _setup(path)
    assert grid.dtype == torch.float64
    rel = ((grid - ref["t_steps"]).abs() / ref["t_steps"]).max().item()
    assert rel < 1e-12, rel


@pytest.mark.parametrize("path", REFS, ids=lambda p: p.stem)
def test_decoded_params_match(path):
    meta, _, params, *_ = _setup(path)
    table = params.decoded()
    for name in ("r", "weight", "scale_dir", "scale_time"):
        expected = torch.tensor([step[name] for step in meta["decoded_params"]], dtype=torch.float64)
        assert torch.allclose(getattr(table, name), expected, rtol=1e-12, atol=1e-15), name


@pytest.mark.parametrize("path", REFS, ids=lambda p: p.stem)
@pytest.mark.parametrize("parallel", [True, False])
def test_trajectory_float64(path, parallel):
    meta, ref, params, grid, denoiser, x = _setup(path)
    traj = _trajectory(denoiser, x, grid, params, parallel=parallel)
    expected = ref["trajectory"]
    assert traj.shape == expected.shape
    for i in range(expected.shape[0]):
        rel = ((traj[i] - expected[i]).norm() / expected[i].norm()).item()
        assert rel < 1e-9, (i, rel)
    assert torch.equal(traj[-1], sample(denoiser, x, grid, params, parallel=parallel))
    assert ((traj[-1] - ref["final"]).norm() / ref["final"].norm()).item() < 1e-9


@pytest.mark.parametrize("path", REFS, ids=lambda p: p.stem)
def test_trajectory_float32(path):
    meta, ref, params, grid, denoiser, x = _setup(path)
    out = sample(denoiser, x.float(), grid, params)
    assert out.dtype == torch.float32
    rel = ((out.double() - ref["final"]).abs().max() / ref["final"].abs().max()).item()
    assert rel < 2e-5, rel


@pytest.mark.parametrize("path", REFS, ids=lambda p: p.stem)
def test_parallel_equals_sequential_and_chunked(path):
    _, _, params, grid, denoiser, x = _setup(path)
    batched = sample(denoiser, x, grid, params, parallel=True)
    for mode in (False, 1):
        other = sample(denoiser, x, grid, params, parallel=mode)
        assert torch.allclose(batched, other, rtol=1e-12, atol=1e-12)
