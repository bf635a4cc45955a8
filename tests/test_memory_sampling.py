"""lowmcgm.memory.sampling: pose guidance's memory, traced on the full SD 1.5 architecture."""

from __future__ import annotations

import pytest

from lowmcgm.memory.sampling import estimate_sampling


def test_latent_guidance_costs_a_backward_which_stays_below_the_decode_on_sd():
    none, latent = (estimate_sampling("sd15", 512, mode)["result"] for mode in ("none", "latent"))
    checkpointed = estimate_sampling("sd15", 512, "latent", guidance_checkpointing=True)["result"]
    assert none["weights_bytes"] == latent["weights_bytes"] > 1.5 * 2**30  # fp16 UNet + VAE
    # The backward to the latent keeps activations a plain no-grad step frees at once: every one up
    # to the guided layers' block without checkpointing (SD's choice), each block's input with it.
    assert not latent["guidance_checkpointing"]
    assert latent["step_peak_bytes"] > 2 * checkpointed["step_peak_bytes"]
    assert checkpointed["step_peak_bytes"] >= none["step_peak_bytes"]
    # Even so, the VAE decode needs more: the peak is unguided sampling's.
    assert latent["decode_peak_bytes"] == none["decode_peak_bytes"] > latent["step_peak_bytes"]
    assert latent["peak_bytes"] == none["peak_bytes"]


def test_sdxl_decodes_in_fp32_and_its_text_encoders_only_visit():
    plain, fp8 = (estimate_sampling("sdxl-base", 1024, "none", fp8_unet=on)["result"] for on in (False, True))
    # fp16 UNet 4.78 GiB and VAE 0.16 stay; the text encoders (1.52) come only to encode; fp8
    # halves the UNet.
    assert 4.8 * 2**30 < plain["weights_bytes"] < 5.1 * 2**30
    assert 1.4 * 2**30 < plain["text_encoders_bytes"] == fp8["text_encoders_bytes"] < 1.6 * 2**30
    assert plain["weights_bytes"] - fp8["weights_bytes"] > 2.3 * 2**30
    # The VAE's decode in fp32 at 1024 px (its config says force_upcast) is where sampling peaks,
    # above the text encoders' visit: an sdxl-8gb artifact samples within 8 GB with the card margin.
    assert fp8["decode_peak_bytes"] > fp8["text_encoders_bytes"] > fp8["step_peak_bytes"]
    assert fp8["peak_bytes"] == fp8["weights_bytes"] + fp8["decode_peak_bytes"]
    assert fp8["peak_bytes"] * 1.1 + 0.6 * 2**30 < 8 * 2**30


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        estimate_sampling("sd15", 512, "strong")
