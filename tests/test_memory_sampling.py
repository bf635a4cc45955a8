"""lowmcgm.memory.sampling: pose guidance's memory, traced on the full SD 1.5 architecture."""

from __future__ import annotations

import pytest

from lowmcgm.memory.sampling import estimate_sampling


def test_latent_guidance_costs_a_backward():
    none, latent = (estimate_sampling("sd15", 512, mode)["result"] for mode in ("none", "latent"))
    assert none["weights_bytes"] == latent["weights_bytes"] > 1.5 * 2**30  # fp16 UNet + VAE
    # The backward to the latent keeps activations a plain no-grad step frees at once.
    assert latent["step_peak_bytes"] > 2 * none["step_peak_bytes"]
    assert latent["decode_peak_bytes"] == none["decode_peak_bytes"]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        estimate_sampling("sd15", 512, "strong")
