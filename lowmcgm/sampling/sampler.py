"""Pose-mask sampling: an artifact's handles, LoRA and mask encoder on diffusers' Stable Diffusion pipelines.

Owns building the context the UNet sees (77 text tokens, then one mask token per handle in the
order the handles appear in the prompt; k all-zero tokens for the unconditional branch, paper
sec. 3.2), placing the models for sampling, and ``sample_artifact``, the library's ``lowmcgm
sample``. Reading prompts and poses and pairing each pose with its handle is ``prompts.py``'s; the
pipeline is ``pipeline.py``'s; the PNG chunks, image names and samples.json are ``records.py``'s;
the trainer's preview hook is ``training_previews.py``'s; drawing is ``previews.py``'s. The
denoising loop, schedulers, classifier-free guidance and VAE decode stay diffusers' own: we only
pass ``prompt_embeds`` and ``negative_prompt_embeds`` to a stock ``StableDiffusionPipeline``, or to a
stock ``StableDiffusionXLPipeline`` with its pooled embeddings too (SDXL base models).

Example:
    >>> plans = plan_prompts([PromptSpec("a photo of <asset0>", {"<asset0>": "run.png"})], {},
    ...                      artifact.handles, no_mask_reason(settings, artifact))
    >>> sampler = build_sampler(base, artifact, settings)
    >>> images = sampler.generate(plans[0], seeds=[7, 8], settings=settings)
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lowmcgm.adapters import cast_keeping_fp8, is_stored_in_fp8, store_in_fp8
from lowmcgm.artifact import Artifact, file_sha256, load_artifact, stale_pooling_warning
from lowmcgm.attention_capture import CrossAttentionStore, install_capture, loss_layer_names, remove_capture
from lowmcgm.config import SampleSettings
from lowmcgm.errors import UserError
from lowmcgm.mask_encoder import MaskEncoder, append_mask_tokens, zero_mask_tokens
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.base import BaseModel
from lowmcgm.models.dtypes import torch_dtype
from lowmcgm.models.families import family_of_encoder_count
from lowmcgm.models.loading import load_base_model
from lowmcgm.models.text_conditioning import tokenize
from lowmcgm.runs.folder import check_sample_folder, clear_earlier_samples, earlier_samples
from lowmcgm.runs.output import check_output_dir
from lowmcgm.runs.write_guard import check_not_inputs
from lowmcgm.sampling.checks import check_on_base, plan_sampling
from lowmcgm.sampling.latent_guidance import LatentGuidance, guidance_layers
from lowmcgm.sampling.pipeline import Pipeline, base_modules, build_pipeline
from lowmcgm.sampling.pose_guidance import (DEFAULT_STRENGTH, PoseGuide, guidance_rule, guided_attention,
                                             guided_columns, noise_level)
from lowmcgm.sampling.prompts import (PlannedPrompt, PoseSource, PromptSpec, fit_pose_masks, handles_in_text,
                                      no_mask_reason)
from lowmcgm.sampling.records import sample_files, write_samples

ProgressFn = Callable[[dict[str, Any]], None]
ATTN_PICTURE_DOWNSCALE = 0  # attention pictures read the layers the default attention loss trains (auto)


@dataclasses.dataclass
class Conditioning:
    """What the pipeline gets for one prompt's images: contexts, and SDXL's pooled embeddings.

    Attributes:
        cond, uncond: (num, 77 + k, d) contexts of the conditional and unconditional branches.
        pooled, uncond_pooled: (num, p) the second text encoder's pooled embeddings (SDXL), or None.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None

    def pipe_kwargs(self) -> dict[str, torch.Tensor]:
        """The pipeline's ``*_embeds`` arguments."""
        kwargs = {"prompt_embeds": self.cond, "negative_prompt_embeds": self.uncond}
        if self.pooled is not None:
            kwargs |= {"pooled_prompt_embeds": self.pooled, "negative_pooled_prompt_embeds": self.uncond_pooled}
        return kwargs


class PoseSampler:
    """A stock SD or SDXL pipeline plus the mask encoder: it builds the context, diffusers samples.

    Args:
        pipe: the pipeline (``build_pipeline``), its text encoders already holding the handles.
        mask_encoder: the trained encoder, or None (no mask tokens).
        autocast: a context-manager factory around sampling (the trainer's accelerator's during
            previews, where frozen weights are half precision and trainable ones fp32).
        store: the store of capture processors already installed on the UNet (training), or None
            to install capture only while an attention picture is drawn.
        base: the base model the pipeline runs (its family says what the UNet is conditioned on).
        device: where sampling runs (with CPU offload, where each model visits).
        text_encoders_home: where the text encoders wait between prompts ("cpu"), visiting
            ``device`` only to encode; None keeps them where they are.
        state: the artifact's state on the pipeline's models (``build_sampler``), for taking it off
            again; None where the caller owns it (training previews).
    """

    def __init__(self, pipe: Pipeline, mask_encoder: MaskEncoder | None, base: BaseModel, device: torch.device,
                 autocast: Callable[[], Any] = contextlib.nullcontext, store: CrossAttentionStore | None = None,
                 text_encoders_home: str | None = None, state: MCGMState | None = None):
        self.pipe = pipe
        self.base = base
        self.device = device
        self.state = state
        self.mask_encoder = mask_encoder
        self.autocast = autocast
        self.store = store
        self.text_encoders_home = text_encoders_home

    def encode(self, plan: PlannedPrompt, num: int, negative_prompt: str, height: int, width: int) -> Conditioning:
        """The contexts of both branches, each (num, 77 + k, d), and on SDXL the pooled embeddings.

        The conditional context ends with the k mask tokens in handle order; the unconditional one
        with k zero tokens, as in training (paper sec. 3.2). Without mask tokens both are (num, 77, d).
        The pooled embeddings are the text's alone: mask tokens enter only the context.
        """
        device = self.device
        # Handles are tokens of every tokenizer, so the family's own encoding carries them.
        text = Conditioning(*self.base.family.encode_for_pipeline(
            self.pipe, plan.text, num, negative_prompt or None, device, lambda: self._text_encoders_on(device)))
        tokens = None
        if plan.use_mask_tokens and self.mask_encoder is not None and plan.handles:
            masks = fit_pose_masks(plan, height, width)[None].to(device)  # (1, k, H, W)
            tokens = self.mask_encoder(masks).expand(num, -1, -1)  # (num, k, d)
        zeros = zero_mask_tokens(num, tokens.shape[1], tokens.shape[2], text.uncond) if tokens is not None else None
        return dataclasses.replace(text, cond=append_mask_tokens(text.cond, tokens),
                                   uncond=append_mask_tokens(text.uncond, zeros))

    @contextlib.contextmanager
    def _text_encoders_on(self, device: torch.device) -> Iterator[None]:
        """The text encoders on ``device`` while they encode, back home after (if they have one)."""
        if self.text_encoders_home is None:
            yield
            return
        encoders = self.base.text_encoders
        for encoder in encoders:
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.to(self.text_encoders_home)

    @torch.no_grad()
    def generate(self, plan: PlannedPrompt, seeds: list[int], settings: SampleSettings,
                 on_step: Callable[..., dict] | None = None) -> list[Image.Image]:
        """One image per seed, each from its own CPU generator (the same on any device and batch).

        With ``settings.pose_guidance`` on, each posed handle is pulled into its pose mask while
        diffusers' pipeline samples (``pose_guidance``); ``on_step`` runs after the guidance.
        """
        height, width = settings.height, settings.width
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with self.autocast(), contextlib.ExitStack() as stack:
            conditioning = self.encode(plan, len(seeds), settings.negative_prompt, height, width)
            callbacks, extra = [], {}
            guide = self.pose_guide(plan, settings, len(seeds))
            if guide is not None and settings.pose_guidance == "attention":
                self.pipe.scheduler.set_timesteps(settings.steps)
                guide.noise_level = noise_level(self.pipe.scheduler, self.pipe.scheduler.timesteps[0])
                stack.enter_context(guided_attention(self.pipe.unet, guide))
                callbacks.append(guide.on_step_end)
            elif guide is not None and settings.pose_guidance == "latent":
                latent = LatentGuidance(self.pipe.unet, guidance_layers(self.pipe.unet, settings.pose_guidance_layers),
                                        conditioning.cond, guide, settings,
                                        added_cond_kwargs=self.base.family.added_cond_kwargs(
                                            self.base, conditioning.pooled, height, width),
                                        checkpointing=self.base.family.guidance_checkpointing)
                extra["latents"] = self._guided_first_latents(latent, generators, settings, conditioning.cond)
                callbacks.append(latent.on_step_end)
            if on_step is not None:
                callbacks.append(on_step)
            result = self.pipe(
                **conditioning.pipe_kwargs(), height=height, width=width,
                num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                generator=generators, output_type="pil",
                callback_on_step_end=_chain(callbacks) if callbacks else None, **extra,
            )
        return result.images

    def token_ids(self, plan: PlannedPrompt) -> list[int]:
        """The prompt's token ids as its encoding read them (``text_conditioning``): key columns are
        their positions. SDXL's two tokenizers split a prompt alike (only their padding differs),
        so the first one's positions are the context's."""
        return tokenize(self.pipe.tokenizer, [plan.text])[0].tolist()

    def pose_guide(self, plan: PlannedPrompt, settings: SampleSettings, num: int) -> PoseGuide | None:
        """The guide of ``plan``'s posed handles, or None (guidance off, or every pose blank)."""
        if settings.pose_guidance == "none" or not any(m is not None for m in plan.pose_masks):
            return None
        tokenizer = self.pipe.tokenizer
        start = tokenizer.model_max_length if plan.use_mask_tokens and self.mask_encoder is not None else None
        columns, masks, subjects = guided_columns(self.token_ids(plan), tokenizer.convert_tokens_to_ids(plan.handles),
                                                  fit_pose_masks(plan, settings.height, settings.width), start)
        if not columns:
            return None
        settings = resolve_guidance(settings)  # one place says what a 0 strength or step count means
        return PoseGuide(columns, masks, settings.pose_guidance_strength, settings.pose_guidance_steps,
                         uncond_rows=num if settings.guidance_scale > 1 else 0, subjects=subjects,
                         fade=guidance_rule(settings) in ("fixed", "normalized"), bias_rule=settings.pose_guidance_bias,
                         self_strength=settings.pose_guidance_self_attention)

    def _guided_first_latents(self, latent: LatentGuidance, generators: list[torch.Generator],
                              settings: SampleSettings, like: torch.Tensor) -> torch.Tensor:
        """The initial noise the pipeline would draw from ``generators``, guided once for step 0."""
        pipe = self.pipe
        scale = pipe.vae_scale_factor
        shape = (len(generators), pipe.unet.config.in_channels, settings.height // scale, settings.width // scale)
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=like.dtype)
        pipe.scheduler.set_timesteps(settings.steps, device=self.device)
        sigma = pipe.scheduler.init_noise_sigma
        guided = latent.step(noise * sigma, pipe.scheduler.timesteps[0], pipe.scheduler)
        return guided / sigma  # the pipeline multiplies by init_noise_sigma again

    def generate_with_attention(self, plan: PlannedPrompt, seed: int, settings: SampleSettings
                                ) -> tuple[Image.Image, list[tuple[str, torch.Tensor]]]:
        """One image and, per handle and mask token, its cross-attention map averaged over steps.

        Returns:
            The image and ``(label, (h, w) map)`` pairs: handles first, then ``mask <handle>``.
        """
        tokenizer = self.pipe.tokenizer
        text_len = tokenizer.model_max_length
        ids = self.token_ids(plan)
        columns, labels = [], []
        for handle in plan.handles:
            token = tokenizer.convert_tokens_to_ids(handle)
            if token in ids:  # a handle past token 77 was cut off: it has no column
                columns.append(ids.index(token))
                labels.append(handle)
        if plan.use_mask_tokens and self.mask_encoder is not None:
            columns += [text_len + i for i in range(len(plan.handles))]
            labels += [f"mask {h}" for h in plan.handles]
        if not columns:
            return self.generate(plan, [seed], settings)[0], []

        unet = self.pipe.unet
        store = self.store or CrossAttentionStore()
        installed = None
        if self.store is None:
            installed = install_capture(unet, loss_layer_names(unet, ATTN_PICTURE_DOWNSCALE), store)
        rows = 2 if settings.guidance_scale > 1 else 1  # diffusers' guidance doubles the batch
        key_index = torch.tensor(columns)[None].expand(rows, -1)  # (rows, S)
        collected: list[torch.Tensor] = []

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            # The store holds one UNet call; take it, then arm it for the next step. The last row
            # is the conditional sample (diffusers puts the unconditional batch first).
            collected.append(store.mean_maps((settings.height, settings.width))[-1].float().cpu())
            store.begin(key_index)
            return kwargs

        store.begin(key_index)
        try:
            image = self.generate(plan, [seed], settings, on_step=on_step)[0]
        finally:
            store.clear()
            if installed is not None:
                remove_capture(unet, installed)
        maps = torch.stack(collected).mean(0)  # (S, h, w)
        return image, list(zip(labels, maps))


def _chain(callbacks: list[Callable[..., dict]]) -> Callable[..., dict]:
    """One ``callback_on_step_end`` running several in order, each seeing the last one's tensors."""
    def run(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        for callback in callbacks:
            kwargs = callback(pipe, step, timestep, kwargs)
        return kwargs
    return run


def trained_with_fp8(artifact: Artifact) -> tuple[bool, bool]:
    """Whether the artifact's run stored its frozen UNet (``model.fp8_base``) and its text encoders
    (``model.fp8_text_encoders``) in fp8."""
    model = artifact.meta.get("training_config", {}).get("model", {})
    return bool(model.get("fp8_base", False)), bool(model.get("fp8_text_encoders", False))


def check_base_matches(artifact: Artifact, base: BaseModel, artifact_path: Path) -> None:
    """Refuse a base model of another architecture than the artifact was trained on."""
    made_for = artifact.meta.get("base_model", "?")
    # An artifact holds the handles' rows of each text encoder it was trained with (SDXL: two).
    encoders = len(artifact.handle_vector_sets)
    if encoders != len(base.text_encoders):
        kinds = (family_of_encoder_count(encoders), family_of_encoder_count(len(base.text_encoders)))
        raise UserError(f"{artifact_path} is an {kinds[0]} artifact, made for base model '{made_for}', but base model "
                        f"'{base.name}' is an {kinds[1]} model: pass --base-model {made_for} or a copy of it.")
    recorded_hash = artifact.meta.get("base_model_hash")
    if artifact.text_width != base.text_width or (recorded_hash and recorded_hash != base.config_hash):
        raise UserError(
            f"{artifact_path} was made for base model '{made_for}' (text width {artifact.text_width}, "
            f"config hash {recorded_hash}), but base model '{base.name}' differs (text width "
            f"{base.text_width}, config hash {base.config_hash}): pass --base-model {made_for} or a copy of it.")
    recorded_prediction = artifact.meta.get("prediction_type")
    if recorded_prediction and recorded_prediction != base.prediction_type:
        raise UserError(f"{artifact_path} was made for base model '{made_for}', which predicts "
                        f"{recorded_prediction}, but '{base.name}' predicts {base.prediction_type}: "
                        f"pass --base-model {made_for}.")


def apply_artifact(base: BaseModel, artifact: Artifact) -> MCGMState:
    """Install the artifact on ``base`` for sampling; return its state (``state.remove(base)`` takes it off).

    ``base`` may be freshly loaded (``lowmcgm sample``) or one an earlier state was removed from
    (``lowmcgm run`` after ``train()``, the web page between samples): either way the images are
    the ones ``sample`` draws from the file.
    """
    state = MCGMState.from_artifact(base, artifact)
    for module in base_modules(base):
        module.eval()
    return state


def resolve_guidance(settings: SampleSettings) -> SampleSettings:
    """Settings with the guidance strength and steps a 0 stands for written out (for the records)."""
    if settings.pose_guidance == "none":
        return settings
    return dataclasses.replace(
        settings, pose_guidance_strength=settings.pose_guidance_strength or DEFAULT_STRENGTH[guidance_rule(settings)],
        pose_guidance_steps=settings.pose_guidance_steps or max(1, settings.steps // 2))


def resolve_dtype(settings: SampleSettings) -> str:
    return settings.dtype or ("fp16" if torch.cuda.is_available() else "fp32")


def build_sampler(base: BaseModel, artifact: Artifact, settings: SampleSettings) -> PoseSampler:
    """Apply the artifact to ``base`` and place everything for sampling (device, dtype, VAE options)."""
    state = apply_artifact(base, artifact)
    encoder = state.mask_encoder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(resolve_dtype(settings))
    pipe = build_pipeline(base, settings.scheduler)
    for module in base_modules(base):
        cast_keeping_fp8(module, dtype)  # not module.to(): diffusers warns about every cast, even to the same dtype
    # An artifact trained against a UNet stored in fp8 (model.fp8_base, e.g. preset sdxl-8gb) samples
    # on one too: the weights it learned against, the images `lowmcgm run` drew, and half the UNet's
    # memory. The same for text encoders stored in fp8 (model.fp8_text_encoders, preset sdxl-6gb).
    unet_in_fp8, text_encoders_in_fp8 = trained_with_fp8(artifact)
    for module in [base.unet] * unet_in_fp8 + base.text_encoders * text_encoders_in_fp8:
        if not is_stored_in_fp8(module):
            store_in_fp8(module, dtype)
    # SDXL's text encoders (1.5 GiB in fp16) run once per prompt: between prompts they wait on the
    # CPU, which keeps an sdxl-8gb artifact's sampling within 8 GB (its peak is the fp32 VAE decode:
    # docs/benchmarks.md, "Sampling memory with pose guidance").
    wait = base.family.text_encoders_wait_on_cpu and device.type == "cuda" and not settings.use_cpu_offload
    home = "cpu" if wait else None
    text_encoders = base.text_encoders
    if settings.use_cpu_offload:
        pipe.enable_model_cpu_offload()  # each model visits the GPU only while it runs
    else:
        for module in base_modules(base):
            module.to(home if home is not None and module in text_encoders else device)
    if settings.use_vae_slicing:
        base.vae.enable_slicing()
    if settings.use_vae_tiling:
        base.vae.enable_tiling()
    if encoder is not None:
        encoder.to(device, dtype)
    return PoseSampler(pipe, encoder, base, device, text_encoders_home=home, state=state)


def recorded_base_model(artifact: Artifact) -> tuple[str, str]:
    """The base model ``artifact`` was trained on, as ``--base-model`` named it (not only the loaded
    model's name, which is a folder's last part), and the single-file config training read it with."""
    model_config = artifact.meta.get("training_config", {}).get("model", {})
    if not isinstance(model_config, dict):  # the artifact's metadata is data from its author
        model_config = {}
    spec = model_config.get("base_model")
    if not isinstance(spec, str) or not spec:
        spec = str(artifact.meta.get("base_model", ""))
    single_file_config = model_config.get("single_file_config", "auto")
    return spec, single_file_config if isinstance(single_file_config, str) else "auto"


def load_base_for(artifact: Artifact, base_model: str) -> BaseModel:
    """The base named by --base-model, else the one the artifact records (read as training read it)."""
    if base_model:
        return load_base_model(base_model)
    recorded, single_file_config = recorded_base_model(artifact)
    try:
        return load_base_model(recorded, single_file_config)
    except UserError as exc:
        raise UserError(f"The artifact was made for base model '{recorded}', which cannot be loaded from "
                        f"here ({exc}); pass --base-model with its folder, file or hub id.") from exc


def sample_artifact(artifact_path: str | Path, specs: list[PromptSpec], poses: dict[str, PoseSource],
                    settings: SampleSettings, out: str | Path, base_model: str = "",
                    base: BaseModel | None = None, report: ProgressFn | None = None, overwrite: bool = False) -> Path:
    """``lowmcgm sample``: check everything, load, sample, write; return the grid's path.

    Args:
        base_model: --base-model; empty takes the artifact's recorded base.
        base: an already loaded base, used instead of loading one (``lowmcgm run`` passes the base
            it trained with, the web page the one it keeps; see ``apply_artifact``). It is handed
            back without the artifact's state, so the next artifact installs on it cleanly.
        overwrite: replace earlier samples in ``out`` (refused otherwise: see ``run_folder``).
    """
    artifact_path = Path(artifact_path)
    artifact = load_artifact(artifact_path)
    plans = plan_sampling(specs, poses, artifact.handles, settings, no_mask_reason(settings, artifact))
    check_sample_folder(Path(out).expanduser(), overwrite)
    inputs = [artifact_path, *(s.file for s in specs)] + [f for plan in plans for f in plan.pose_files if f]
    check_not_inputs(sample_files(plans, settings, Path(out).expanduser()) + earlier_samples(Path(out).expanduser()),
                     inputs)
    out_dir = check_output_dir(str(out))
    base = base if base is not None else load_base_for(artifact, base_model)
    check_base_matches(artifact, base, artifact_path)
    size = int(artifact.meta.get("resolution") or base.resolution)
    settings = dataclasses.replace(settings, height=settings.height or size, width=settings.width or size,
                                   dtype=resolve_dtype(settings))
    settings = resolve_guidance(settings)
    check_on_base(plans, base, settings.height, settings.width, report)
    # Warnings only once every check passed: a refusal stays one line.
    warnings = [stale_pooling_warning(artifact, artifact_path)] + [
        f"{spec.where} names no handle ({', '.join(artifact.handles)}), so its images show none of the learned "
        "subjects." for spec in specs if not handles_in_text(spec.text)]  # allowed, but rarely what was meant
    if report is not None:
        for text in filter(None, warnings):
            report({"kind": "message", "level": "warning", "text": text})
    if overwrite:  # every check passed: the earlier samples give way
        clear_earlier_samples(out_dir)
    sampler = build_sampler(base, artifact, settings)
    try:
        info = {"artifact": str(artifact_path), "artifact_sha256": file_sha256(artifact_path),
                "base_model": base.name}
        return write_samples(sampler, plans, settings, out_dir, info, report)
    finally:
        sampler.state.remove(base)  # handles, mask encoder and LoRA off again, even after a failure


