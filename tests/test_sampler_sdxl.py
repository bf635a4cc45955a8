"""Pose-mask sampling on the tiny SDXL model: diffusers' SDXL pipeline gets our context and pooled
embeddings, the mask tokens reach the UNet, pose guidance runs, and ``lowmcgm sample`` works end to end.

The artifact is built by hand as in ``test_sampler.py`` (handles in both text encoders, mask
encoder and LoRA perturbed from a seeded generator), so no training run is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pooled_written_out, write_box_masks
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from PIL import Image
from test_sampler import make_artifact as make_sd_artifact

from lowmcgm.artifact import load_artifact, save_artifact
from lowmcgm.attention_capture import CrossAttentionStore, install_capture, loss_layer_names
from lowmcgm.cli import EXIT_USER_ERROR, main
from lowmcgm.config import LoraConfig, SampleSettings
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.folder import save_base_model
from lowmcgm.models.sdxl_conditioning import sdxl_time_ids
from lowmcgm.models.text_conditioning import encode_sdxl_text
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.sampling.prompts import PromptSpec, fit_pose_masks, parse_poses, plan_prompts
from lowmcgm.sampling.records import read_png_parameters
from lowmcgm.sampling.sampler import build_sampler
from lowmcgm.sampling.training_previews import TrainingPreviews

SIZE = 64  # tiny-xl's resolution
HANDLES = ["<asset0>", "<asset1>"]
PROMPT = "a photo of <asset0> and <asset1>"
LORA = LoraConfig(rank=2, alpha=2.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"))
BOXES = [(4, 4, 28, 40), (34, 20, 60, 60)]  # one rectangle per handle, (x0, y0, x1, y1)
FAST = SampleSettings(num_images=1, steps=2, height=SIZE, width=SIZE, dtype="fp32", pose_guidance="none")
GUIDED = dataclasses.replace(FAST, steps=8, guidance_scale=3.0)


def make_xl_artifact(path: Path) -> Path:
    """An SDXL artifact as if trained: every part moved away from its initial value."""
    base = build_tiny_base("tiny-xl")
    state = MCGMState.install(base, HANDLES, ["dog", "cat"], use_mask_tokens=True, seed=0)
    state.add_adapters(base, LORA, "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for wrapper in state.handle_sets:
            wrapper.vectors.add_(0.1 * torch.randn(wrapper.vectors.shape, generator=gen))
        for name, param in base.unet.named_parameters():
            if "lora_B" in name:  # non-zero, so a LoRA that fails to load shows
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        proj = state.mask_encoder.proj.weight
        proj.copy_(0.05 * torch.randn(proj.shape, generator=gen))  # rows of different masks differ clearly
    meta = {"base_model": "tiny-xl", "base_model_hash": base.config_hash, "base_model_version": base.version_tag,
            "text_width": base.text_width, "prediction_type": base.prediction_type, "resolution": SIZE}
    save_artifact(state.to_artifact(base, meta), path, dtype="fp32")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sampler_sdxl")
    out = {"artifact": make_xl_artifact(folder / "xl.safetensors"), "folder": folder}
    return out | write_box_masks(folder, BOXES, SIZE)


@pytest.fixture(scope="module")
def sampler(files):
    return build_sampler(build_tiny_base("tiny-xl"), load_artifact(files["artifact"]), FAST)


def _plan(files, poses: dict[str, int], use_mask_tokens: bool = True):
    artifact = load_artifact(files["artifact"])
    reason = None if use_mask_tokens else "--no-mask drops the mask tokens"
    items = [f"{handle}={files[f'm{i}']}" for handle, i in poses.items()]
    return plan_prompts([PromptSpec(PROMPT)], parse_poses(items), artifact.handles, reason,
                        guided=not use_mask_tokens)[0]


@contextlib.contextmanager
def unet_calls(unet: torch.nn.Module):
    """Every UNet call's context and added conditioning (the pipeline's and pose guidance's)."""
    seen: list[dict] = []

    def hook(module, args, kwargs):
        context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        seen.append({"context": context.detach().cpu(),
                     "added": {k: v.detach().cpu() for k, v in kwargs["added_cond_kwargs"].items()}})

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _stock_pipeline(base) -> StableDiffusionXLPipeline:
    scheduler = DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config, algorithm_type="dpmsolver++",
                                                        solver_order=2)  # FAST's dpmpp_2m
    pipe = StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def installed_base(files):
    """A fresh tiny-xl base with the artifact installed, beside the sampler's."""
    base = build_tiny_base("tiny-xl")
    MCGMState.from_artifact(base, load_artifact(files["artifact"]))
    return base


def _encode(base, text: str):
    ids = [t([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for t in (base.tokenizer, base.tokenizer_2)]
    return encode_sdxl_text(base, *ids)


@pytest.mark.parametrize("negative", ["", "snow"], ids=["no negative prompt (zeros)", "negative prompt"])
def test_sample_is_the_stock_sdxl_pipeline_given_our_context_and_pooled_embeddings(files, sampler, negative):
    """Without mask tokens, the image is what a stock SDXL pipeline draws from the artifact's own
    text conditioning, worked out here independently (both encoders' handles, pooled embedding)."""
    settings = dataclasses.replace(FAST, negative_prompt=negative, use_mask_tokens=False)
    plan = _plan(files, {}, use_mask_tokens=False)
    ours = np.asarray(sampler.generate(plan, [7], settings)[0])

    base = installed_base(files)
    with torch.no_grad():
        text = _encode(base, PROMPT)
        if negative:
            uncond = _encode(base, negative)
            uncond_context, uncond_pooled = uncond.context, uncond.pooled
        else:  # diffusers' SDXL default for an empty negative prompt (force_zeros_for_empty_prompt)
            uncond_context, uncond_pooled = torch.zeros_like(text.context), torch.zeros_like(text.pooled)
    theirs = _stock_pipeline(base).to(sampler.pipe.device)(
        prompt_embeds=text.context, pooled_prompt_embeds=text.pooled, negative_prompt_embeds=uncond_context,
        negative_pooled_prompt_embeds=uncond_pooled, height=SIZE, width=SIZE, num_inference_steps=FAST.steps,
        guidance_scale=FAST.guidance_scale, generator=torch.Generator().manual_seed(7), output_type="pil").images[0]
    # Bitwise equal on the CPU; a GPU may round a level apart.
    assert np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max() <= 1
    # The handles are the trained ones: the same prompt on the plain base draws another image.
    plain = _stock_pipeline(build_tiny_base("tiny-xl"))(
        PROMPT, negative_prompt=negative or None, height=SIZE, width=SIZE, num_inference_steps=FAST.steps,
        guidance_scale=FAST.guidance_scale, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.abs(ours.astype(int) - np.asarray(plain).astype(int)).max() > 2


def test_mask_tokens_follow_the_text_and_the_pooled_embedding_reaches_the_unet(files, sampler):
    artifact = load_artifact(files["artifact"])
    plan = _plan(files, {"asset1": 1})  # <asset0> blank
    with unet_calls(sampler.pipe.unet) as seen:
        sampler.generate(plan, [0], FAST)
    assert len(seen) == FAST.steps
    masks = fit_pose_masks(plan, SIZE, SIZE)[None]  # (1, 2, H, W)
    installed = installed_base(files)
    with torch.no_grad():
        want = sampler.mask_encoder(masks.to(sampler.pipe.device))[0].cpu()  # (2, d)
        text = _encode(installed, PROMPT)
    pooled = pooled_written_out(installed.tokenizer_2, installed.text_encoder_2, [PROMPT])[0]
    ids = installed.tokenizer_2(PROMPT).input_ids
    assert max(ids) != ids[ids.index(installed.tokenizer_2.eos_token_id)]  # a handle's id is the highest
    for call in seen:
        context, added = call["context"], call["added"]
        assert context.shape == (2, 77 + 2, artifact.text_width)  # (uncond, cond) x (77 + k) x (32 + 32)
        assert torch.count_nonzero(context[0]) == 0  # no negative prompt: SDXL's zeros, mask tokens too
        torch.testing.assert_close(context[1, 77:], want)
        torch.testing.assert_close(context[1, :77], text.context[0])
        torch.testing.assert_close(added["text_embeds"][1], text.pooled[0])
        torch.testing.assert_close(added["text_embeds"][1], pooled)
        assert added["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2


def test_pose_masks_change_the_image(files, sampler):
    """Posed against blank, and against another pose. (Not against the two poses swapped: keys
    carry no position in cross-attention, so swapping two handles' mask tokens changes nothing.)
    The tiny random model moves pixels by 5 and 8 levels at most here (when written)."""
    def draw(poses):
        return np.asarray(sampler.generate(_plan(files, poses), [3], FAST)[0]).astype(int)

    posed = draw({"asset0": 0, "asset1": 1})
    assert np.abs(posed - draw({})).max() > 2
    assert np.abs(posed - draw({"asset0": 1, "asset1": 1})).max() > 2


def _share_inside(sampler, plan, settings, label: str = "<asset0>") -> float:
    """The share of ``label``'s attention (on the pipeline's own passes) inside ``<asset0>``'s pose."""
    _, maps = sampler.generate_with_attention(plan, seed=3, settings=settings)
    attention = dict(maps)[label]
    mask = fit_pose_masks(plan, settings.height, settings.width)[0][None, None]
    small = torch.nn.functional.adaptive_avg_pool2d(mask, attention.shape)[0, 0]
    return float((attention * small).sum() / attention.sum())


def test_attention_pictures_cover_each_handle_and_mask_token(files, sampler):
    image, maps = sampler.generate_with_attention(_plan(files, {"all": 1}), 0, FAST)
    assert [label for label, _ in maps] == ["<asset0>", "<asset1>", "mask <asset0>", "mask <asset1>"]
    assert all(m.shape == (16, 16) and torch.isfinite(m).all() and m.sum() > 0 for _, m in maps)
    assert image.size == (SIZE, SIZE)


def test_attention_guidance_pulls_attention_into_the_pose(files, sampler):
    plan = _plan(files, {"asset0": 0})
    off = _share_inside(sampler, plan, GUIDED)
    on = _share_inside(sampler, plan, dataclasses.replace(GUIDED, pose_guidance="attention",
                                                          pose_guidance_strength=8.0))
    assert on > off + 0.02, (off, on)


def test_latent_guidance_conditions_its_pass_as_the_pipeline_and_pulls_attention_in(files, sampler):
    """Its own UNet pass gets the pipeline's conditional context, pooled embedding and size numbers;
    the moved latent then raises the share inside the pose on the pipeline's passes. On the tiny
    random model it is the mask token's column that follows (0.21 -> 0.32 -> 0.38 at strength 0,
    30, 100 when written); the handle's own map stays near uniform."""
    plan = _plan(files, {"asset0": 0})
    guided = dataclasses.replace(GUIDED, pose_guidance="latent", pose_guidance_strength=100.0, pose_guidance_steps=4)
    with unet_calls(sampler.pipe.unet) as seen:
        sampler.generate(plan, [3], guided)
    extra = [call for call in seen if call["context"].shape[0] == 1]  # guidance's conditional-only passes
    pipeline = [call for call in seen if call["context"].shape[0] == 2]
    assert len(extra) == guided.pose_guidance_steps and len(pipeline) == guided.steps
    want_ids = sdxl_time_ids(build_tiny_base("tiny-xl"), (SIZE, SIZE), (0, 0), (SIZE, SIZE))
    for call in extra:
        torch.testing.assert_close(call["context"][0], pipeline[0]["context"][1])
        torch.testing.assert_close(call["added"]["text_embeds"][0], pipeline[0]["added"]["text_embeds"][1])
        torch.testing.assert_close(call["added"]["time_ids"], want_ids)
    shares = [_share_inside(sampler, plan, dataclasses.replace(guided, pose_guidance=mode,
                                                               pose_guidance_strength=strength), "mask <asset0>")
              for mode, strength in (("none", 0.0), ("latent", 30.0), ("latent", 100.0))]
    assert shares[0] < shares[1] < shares[2] and shares[2] > shares[0] + 0.02, shares


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_guidance_on_a_tall_image_pulls_attention_into_the_pose(files, sampler, mode):
    """64x96 px (32x48 latents): maps of the image's aspect, and the mask token's share inside the
    pose rises (0.23 -> 0.86 with attention, -> 0.40 with latent guidance, when written)."""
    tall = dataclasses.replace(GUIDED, height=96, width=64)
    plan = _plan(files, {"asset0": 0})
    guided = dataclasses.replace(tall, pose_guidance=mode, pose_guidance_strength=8.0 if mode == "attention" else 100.0,
                                 pose_guidance_steps=4)
    image, maps = sampler.generate_with_attention(plan, 3, guided)
    assert image.size == (64, 96) and all(m.shape == (24, 16) for _, m in maps)
    off, on = (_share_inside(sampler, plan, s, "mask <asset0>") for s in (tall, guided))
    assert on > off + 0.1, (off, on)


def test_training_preview_draws_on_sdxl_with_the_live_state(files, tmp_path):
    """The trainer's preview hook on an SDXL base carrying a live state and training's capture."""
    base = build_tiny_base("tiny-xl")
    state = MCGMState.from_artifact(base, load_artifact(files["artifact"]))
    store = CrossAttentionStore()
    install_capture(base.unet, loss_layer_names(base.unet, 0), store)
    base.unet.train()
    accelerator = types.SimpleNamespace(mixed_precision="no", autocast=contextlib.nullcontext,
                                        device=torch.device("cpu"))
    setup = types.SimpleNamespace(base=base, concept=types.SimpleNamespace(image=torch.zeros(3, SIZE, SIZE)),
                                  accelerator=accelerator, mcgm=state, store=store, device=torch.device("cpu"))
    settings = dataclasses.replace(FAST, pose_guidance="latent", pose_guidance_steps=1)
    previews = TrainingPreviews(tmp_path, _plan(files, {"asset0": 0}), settings, phase1_steps=5)
    previews(setup, types.SimpleNamespace(step=2, phase=2))
    assert Image.open(tmp_path / "step00007.png").size == (SIZE, SIZE)
    assert (tmp_path / "step00007-attention.png").is_file()
    assert base.unet.training  # the hook left the models as it found them


def _sample(files, out: Path, *extra: str) -> int:
    return main(["sample", "--artifact", str(files["artifact"]), "--steps", "2", "--num-images", "1",
                 "--out", str(out), "--prompt", "a photo of <asset0>", *extra])


@pytest.mark.parametrize("base_model", ["recorded", "folder"])
def test_cli_samples_an_sdxl_artifact_at_the_base_resolution(files, tmp_path, base_model):
    extra = []
    if base_model == "folder":
        folder = files["folder"] / "tiny-xl-saved"
        if not folder.exists():
            save_base_model(build_tiny_base("tiny-xl"), folder)
        extra = ["--base-model", str(folder)]
    assert _sample(files, tmp_path / "out", "--pose", f"asset0={files['m0']}", *extra) == 0  # latent guidance
    image = tmp_path / "out" / "p00-000-seed0.png"
    assert Image.open(image).size == (SIZE, SIZE)  # no --height/--width: the artifact's, here the base's
    meta = read_png_parameters(image)
    assert (meta["pose_guidance"], meta["width"], meta["height"]) == ("latent", SIZE, SIZE)
    assert (tmp_path / "out" / "grid.png").is_file()


def test_cli_samples_a_posed_sdxl_image_of_another_aspect(files, tmp_path):
    assert _sample(files, tmp_path / "out", "--pose", f"asset0={files['m0']}", "--width", "64", "--height", "96") == 0
    assert Image.open(tmp_path / "out" / "p00-000-seed0.png").size == (64, 96)  # latent guidance, the default


MIXED = {
    "SD artifact, SDXL base": ("sd", "tiny-xl", "is an SD 1.x/2.x artifact, made for base model 'tiny'"),
    "SDXL artifact, SD base": ("xl", "tiny", "is an SDXL artifact, made for base model 'tiny-xl'"),
    "SDXL artifact, size off the grid": ("xl", "", "multiple of 8"),
}


@pytest.mark.parametrize("case", MIXED.values(), ids=MIXED.keys())
def test_user_errors_on_sdxl_exit_2_with_one_line(files, tmp_path, capsys, case):
    which, base_model, fragment = case
    artifact = files["artifact"] if which == "xl" else make_sd_artifact(tmp_path / "sd.safetensors")
    extra = ["--base-model", base_model] if base_model else ["--height", "60"]
    rc = main(["sample", "--artifact", str(artifact), "--steps", "2", "--out", str(tmp_path / "out"),
               "--prompt", "a photo of <asset0>", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USER_ERROR and fragment in err, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_size_sdxl_draws_poorly_at_is_refused_in_one_line_and_other_shapes_of_its_area_pass(files, tmp_path, capsys):
    # tiny-xl is made for 64x64; under 48x48 in area is refused, whatever the shape.
    rc = main(["sample", "--artifact", str(files["artifact"]), "--steps", "2", "--out", str(tmp_path / "small"),
               "--prompt", "a photo of <asset0>", "--width", "40", "--height", "40"])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USER_ERROR and "40x40 is too small for SDXL model 'tiny-xl'" in err and "\n" not in err
    assert main(["sample", "--artifact", str(files["artifact"]), "--steps", "2", "--out", str(tmp_path / "wide"),
                 "--prompt", "a photo of <asset0>", "--width", "96", "--height", "32"]) == 0


def test_text_encoders_wait_at_home_and_visit_only_to_encode(files):
    # On a CUDA card build_sampler gives SDXL's text encoders the CPU as home (not testable here);
    # the visit itself: moved to the pipeline's device for encode_prompt, back home after, same image.
    base = build_tiny_base("tiny-xl")
    sampler = build_sampler(base, load_artifact(files["artifact"]), FAST)
    assert sampler.text_encoders_home is None  # no CUDA: everything stays on the CPU
    plan = _plan(files, {"<asset0>": 0})
    plain = np.asarray(sampler.generate(plan, [3], FAST)[0])
    moves = []
    for encoder in (base.text_encoder, base.text_encoder_2):
        original = encoder.to
        encoder.to = lambda *args, _to=original, _name=type(encoder).__name__, **kw: (
            moves.append((_name, str(args[0]))), _to(*args, **kw))[1]
    sampler.text_encoders_home = "cpu"
    visited = np.asarray(sampler.generate(plan, [3], FAST)[0])
    np.testing.assert_array_equal(visited, plain)
    device = str(sampler.device)
    assert moves == [("CLIPTextModel", device), ("CLIPTextModelWithProjection", device),
                     ("CLIPTextModel", "cpu"), ("CLIPTextModelWithProjection", "cpu")]


def test_an_sdxl_artifact_from_before_the_pooling_fix_warns_once_when_sampled_or_exported(files, tmp_path, capsys):
    from lowmcgm.artifact import SDXL_POOLING, SDXL_POOLING_KEY

    artifact = load_artifact(files["artifact"])
    assert artifact.meta[SDXL_POOLING_KEY] == SDXL_POOLING  # recorded by every new SDXL artifact
    old = tmp_path / "old.safetensors"
    save_artifact(dataclasses.replace(artifact, meta={k: v for k, v in artifact.meta.items() if k != SDXL_POOLING_KEY}),
                  old, dtype="fp32")
    for path, warned in ((files["artifact"], False), (old, True)):
        out = tmp_path / f"samples-{path.stem}"
        assert main(["sample", "--artifact", str(path), "--steps", "2", "--out", str(out), "--guidance", "none",
                     "--prompt", "a photo of <asset0>"]) == 0
        assert main(["export", str(path), "--format", "embeddings", "--out", str(tmp_path / f"emb-{path.stem}")]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "pooled embedding" in line]
        assert len(lines) == (2 if warned else 0), lines  # one line per command
        assert all(line.startswith("warning: ") and "retrain" in line for line in lines)
