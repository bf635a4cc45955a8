"""models/families.py: each family answers for itself what the rest of the package used to ask with an if."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from lowmcgm.models.families import FAMILIES, family_of_encoder_count
from lowmcgm.models.tiny import build_tiny_base


@pytest.mark.parametrize("name, family, pipeline, encoders", [
    ("tiny", "sd1", StableDiffusionPipeline, 1),
    ("tiny-v", "sd2", StableDiffusionPipeline, 1),
    ("tiny-xl", "sdxl", StableDiffusionXLPipeline, 2),
])
def test_each_tiny_model_is_its_family_and_builds_its_pipeline_over_the_same_modules(name, family, pipeline, encoders):
    base = build_tiny_base(name)
    assert base.family is FAMILIES[family]
    pipe = base.family.build_pipeline(base, DDIMScheduler.from_config(base.noise_scheduler.config))
    assert type(pipe) is pipeline and pipe.unet is base.unet and pipe.vae is base.vae
    assert len(base.text_encoders) == len(base.text_encoder_pairs) == encoders
    assert [e for _, e in base.text_encoder_pairs] == base.text_encoders
    assert base.family.pooled_embedding == base.family.text_encoders_wait_on_cpu == (encoders == 2)


def test_only_sdxl_takes_size_numbers_and_they_are_its_pipelines():
    sd, xl = build_tiny_base("tiny"), build_tiny_base("tiny-xl")
    assert sd.family.photo_time_ids(sd, (96, 80), (8, 0), 64) is None
    assert sd.family.added_cond_kwargs(sd, None, 64, 64) is None
    assert xl.family.photo_time_ids(xl, (96, 80), (8, 0), 64).tolist() == [96, 80, 8, 0, 64, 64]
    pooled = torch.randn(3, xl.text_encoder_2.config.projection_dim)
    added = xl.family.added_cond_kwargs(xl, pooled, 64, 96)
    pipe = xl.family.build_pipeline(xl, xl.noise_scheduler)
    # The pipeline's own builder (a private name, read here only, to pin ours to it).
    theirs = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=pooled.dtype,
                                    text_encoder_projection_dim=xl.text_encoder_2.config.projection_dim)
    assert added["text_embeds"] is pooled
    torch.testing.assert_close(added["time_ids"], theirs.repeat(3, 1), rtol=0, atol=0)


def test_only_an_sdxl_vae_that_asks_for_fp32_keeps_it():
    sd, xl = build_tiny_base("tiny"), build_tiny_base("tiny-xl")
    assert not sd.family.vae_needs_fp32(sd)
    assert xl.family.vae_needs_fp32(xl) == bool(xl.vae.config.get("force_upcast", False))


def test_version_tags_and_labels_are_kohyas_and_the_messages():
    assert [FAMILIES[n].version_tag("epsilon") for n in ("sd1", "sd2", "sdxl")] == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]
    assert FAMILIES["sd2"].version_tag("v_prediction") == "sd_v2_v"
    assert (family_of_encoder_count(1), family_of_encoder_count(2)) == ("SD 1.x/2.x", "SDXL")
