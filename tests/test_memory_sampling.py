"""lowmcgm.memory.sampling: pose guidance's memory, traced on the full SD 1.5 architecture."""

from __future__ import annotations

import pytest

from lowmcgm.memory.sampling import estimate_sampling


def test_latent_guidance_costs_a_backward_which_checkpointing_keeps_small():
    none, latent = (estimate_sampling("sd15", 512, mode)["result"] for mode in ("none", "latent"))
    stored = estimate_sampling("sd15", 512, "latent", guidance_checkpointing=False)["result"]
    assert none["weights_bytes"] == latent["weights_bytes"] > 1.5 * 2**30  # fp16 UNet + VAE
    # The backward to the latent keeps activations a plain no-grad step frees at once: every one
    # without checkpointing, each block's input with it (the default).
    assert stored["step_peak_bytes"] > 2 * latent["step_peak_bytes"]
    assert latent["step_peak_bytes"] > none["step_peak_bytes"]
    assert latent["decode_peak_bytes"] == none["decode_peak_bytes"]


def test_sdxl_counts_its_text_encoders_and_decodes_in_fp32():
    plain, fp8 = (estimate_sampling("sdxl-base", 1024, "none", fp8_unet=on)["result"] for on in (False, True))
    # fp16 UNet 4.78 GiB, text encoders 1.52, VAE 0.16; fp8 halves the UNet.
    assert 6.3 * 2**30 < plain["weights_bytes"] < 6.6 * 2**30
    assert plain["weights_bytes"] - fp8["weights_bytes"] > 2.3 * 2**30
    # The VAE's decode in fp32 at 1024 px (its config says force_upcast) is where sampling peaks.
    assert fp8["decode_peak_bytes"] > 2 * 2**30 > fp8["step_peak_bytes"]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        estimate_sampling("sd15", 512, "strong")
