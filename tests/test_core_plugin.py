"""EPD-Plugin in the core: Euler + plugin is the EPD solver; misuse is refused."""

from __future__ import annotations

import pytest
import torch

from epd_core import GaussianMixture, load_params, make_schedule, sample
from epd_core.plugin import PluginDenoiser, PluginMisuse
from epd_dev.shared_data import official_path

pytestmark = pytest.mark.core


def _euler(plugin, denoiser, x, sigmas):
    for i in range(sigmas.shape[0] - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = plugin(denoiser, x, s.expand(x.shape[0]))
        x = x + (s_next - s) * (x - den) / s if s_next > 0 else den
    return x


@pytest.mark.parametrize(
    "name",
    [
        "sd15-best.pkl",
        "00018-cifar10-4-5-ipndm-uni1.0-afs.pkl",
        "00002-cifar10-4-5-epd-uni1.0-afs.pkl",
        "flux-best.pkl",
    ],
)
@pytest.mark.parametrize("to_zero", [False, True])
def test_euler_plus_plugin_is_epd(name, to_zero):
    p = load_params(official_path(name))
    gm = GaussianMixture.reference()
    den = gm.denoise_flow if p.is_flow else gm.denoise_ve
    grid = make_schedule(p)
    if to_zero:
        grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x if p.is_flow else x * grid[0]
    expected = sample(den, x, grid, p)
    got = _euler(PluginDenoiser(p, grid), den, x, grid)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_plugin_refuses_intermediate_and_repeated_calls():
    p = load_params(official_path("sd15-best.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(p)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64) * grid[0]
    plugin = PluginDenoiser(p, grid)
    plugin(gm.denoise_ve, x, grid[:1])
    with pytest.raises(PluginMisuse, match="between the table's grid points"):
        plugin(gm.denoise_ve, x, (grid[1:2] + grid[2:3]) / 2)
    with pytest.raises(PluginMisuse, match="point 0 was due"):
        PluginDenoiser(p, grid)(gm.denoise_ve, x, grid[1:2])
