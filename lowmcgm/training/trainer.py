"""Training: one photo and its masks -> handles, mask encoder and LoRA, in two phases.

Phase 1 trains only the handle embeddings and the mask encoder against the frozen model; phase 2
adds LoRA adapters to the UNet (optionally the text encoder) while the handles and the encoder keep
training. The method, and where it deviates from the reference code, is in docs/method.md.
Reading order: ``train`` (checks, the base, the ``Setup``) -> ``recipe.TrainingRecipe`` (phases,
the loop, checkpoints, the artifact) -> ``step.train_step`` -> ``step.compute_step_loss``; the
batch a step draws is ``batches.py``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from lowmcgm.adapters import cast_frozen, store_in_fp8
from lowmcgm.attention_capture import (CrossAttentionStore, describe_loss_layers, install_capture, loss_layer_names)
from lowmcgm.config import Config
from lowmcgm.data import ConceptImage, build_prompt, load_concept_image
from lowmcgm.errors import UserError
from lowmcgm.handles import check_handle_names, handle_positions
from lowmcgm.mask_encoder import compute_token_rms
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.base import BaseModel
from lowmcgm.models.dtypes import precision_dtype
from lowmcgm.models.fit import check_settings_fit
from lowmcgm.models.loading import load_base_model
from lowmcgm.models.text_conditioning import (encode_prompt_ids, tokenize_prompts)
from lowmcgm.runs.folder import RUN_FOLDERS, check_run_folder, clear_earlier_run, run_files
from lowmcgm.runs.identity import input_fingerprints
from lowmcgm.runs.output import check_output_dir, write_effective_config
from lowmcgm.runs.write_guard import check_not_inputs
from lowmcgm.training.accelerator import AcceleratorLike
from lowmcgm.training.batches import encode_photo
from lowmcgm.training.checkpointing import checkpoint_text_encoder, checkpoint_unet
from lowmcgm.training.checkpoints import (check_resume, check_resume_base)
from lowmcgm.training.optimizer import choose_optimizer
from lowmcgm.training.recipe import TrainingRecipe
from lowmcgm.training.state import PreviewFn, ProgressFn, Setup


def train(cfg: Config, on_progress: ProgressFn | None = None, resume: bool = False,
          base: BaseModel | None = None, on_preview: PreviewFn | None = None, overwrite: bool = False) -> Path:
    """Run both phases and write the artifact; return its path.

    Args:
        cfg: a validated configuration.
        on_progress: receives event dicts (``kind``: ``message``, ``step``, ``phase``, ``saved``).
        resume: continue from ``<out>/checkpoints/last.safetensors``.
        base: an already loaded base model (``lowmcgm run`` trains then samples with one load).
        on_preview: called with the live setup and state before training and every
            ``output.preview_every`` steps (``lowmcgm run`` samples previews with it). It must leave
            the models as it found them (train mode, capture store cleared).
        overwrite: replace another run found in the output folder (refused otherwise, see ``runs.folder``).
    """
    report = on_progress or (lambda event: None)
    out, handle_names, warnings = check_inputs(cfg, resume, overwrite)
    inputs = input_fingerprints(cfg)  # as read now: a checkpoint records what this run trains on
    for warning in warnings:
        report({"kind": "message", "level": "warning", "text": warning})
    # 8-bit AdamW runs a test step now, before weights load: a broken bitsandbytes is said (or
    # refused, leaving the output folder empty) in seconds, not as a traceback at the first step.
    optimizer_name = choose_optimizer(cfg.train, training_device(), _say_on_main_process(report))

    base = base or load_base_model(cfg.model.base_model, cfg.model.single_file_config)
    check_settings_fit(cfg, base)  # resolution and LoRA targets, before anything is written
    if resume:  # a checkpoint of another architecture would fail to load after config.toml was rewritten
        check_resume_base(out, base)
    if cfg.lora.init_lora:  # its shapes against this base, before any step rather than at phase 2
        from lowmcgm.interop.lora_import import check_init_lora, check_lora_fits

        check_lora_fits(check_init_lora(Path(cfg.lora.init_lora), cfg.lora), base.unet,
                        base.text_encoder if cfg.lora.use_text_encoder_lora else None)
    # Written once the base model loaded: a refused base leaves the output folder empty.
    if overwrite:
        clear_earlier_run(out, cfg.output.artifact_name)
    write_effective_config(cfg, out, resolved_notes(cfg, base))
    setup = build_setup(cfg, base, handle_names, report, optimizer_name, inputs)
    recipe = TrainingRecipe(setup, out, on_preview)
    if resume:
        recipe.load_checkpoint()
    else:
        recipe.enter_phase(1)
        if on_preview is not None:
            on_preview(setup, recipe.state)
    recipe.train()
    path = recipe.save_artifact()
    recipe.close()
    return path


def resolved_notes(cfg: Config, base: BaseModel) -> tuple[str, ...]:
    """What settings left to the model resolve to on ``base`` (config.toml and the estimate say it)."""
    if not cfg.loss.use_attention_loss:
        return ()
    latent_px = (cfg.model.resolution or base.resolution) // base.vae_scale_factor
    return (describe_loss_layers(base.unet, cfg.loss.attn_loss_downscale, latent_px),)


def check_inputs(cfg: Config, resume: bool = False, overwrite: bool = False) -> tuple[Path, list[str], list[str]]:
    """Everything checkable before weights load; return (output folder, handle names, warnings).

    The output folder is checked (created, written to, measured for free space) last, so a run
    refused for its inputs leaves nothing behind, and before any weights load, so a full disk or a
    read-only folder fails in a second rather than after hours of training.
    """
    if len(cfg.data.masks) > cfg.data.max_concepts:
        raise UserError(f"{len(cfg.data.masks)} masks given, but this preset allows at most "
                        f"{cfg.data.max_concepts} (data.max_concepts): drop some masks, or raise "
                        "data.max_concepts at the risk of subjects blending.")
    handle_names = check_handle_names(list(cfg.data.handles), len(cfg.data.masks))
    # Inputs are checked at a small size: a bad mask fails in a second.
    _, warnings = load_concept_image(cfg.data.image, list(cfg.data.masks), 64)
    if cfg.lora.init_lora:
        from lowmcgm.interop.lora_import import check_init_lora

        check_init_lora(Path(cfg.lora.init_lora), cfg.lora)
    out = Path(cfg.output.out).expanduser()
    check_not_inputs(run_files(out, cfg.output.artifact_name), input_files(cfg),
                     folders=[out / name for name in RUN_FOLDERS])
    check_run_folder(out, cfg.output.artifact_name, resume, overwrite)
    out = check_output_dir(cfg.output.out, resume=resume)
    if resume:
        check_resume(cfg, out)
    return out, handle_names, warnings


def input_files(cfg: Config) -> list[str]:
    """Every file a run reads (none may be among the files it writes)."""
    files = [cfg.data.image, *cfg.data.masks, cfg.lora.init_lora]
    if cfg.train.class_images_dir and Path(cfg.train.class_images_dir).expanduser().is_dir():
        files += [str(p) for p in Path(cfg.train.class_images_dir).expanduser().iterdir()]
    return files


def training_device() -> torch.device:
    """The device ``build_setup``'s accelerator will train on (under ``accelerate launch``, each
    process's own GPU), known before it starts."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def build_setup(cfg: Config, base: BaseModel, handle_names: list[str], report: ProgressFn,
                optimizer_name: str, inputs: dict[str, Any] | None = None) -> Setup:
    """Start the accelerator, read the photo at training size, then ``prepare_setup``."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(cfg, report))
    concept, _ = load_concept_image(cfg.data.image, list(cfg.data.masks), cfg.model.resolution or base.resolution)

    def load_prior(device: torch.device) -> torch.Tensor:
        from lowmcgm.training.prior import load_prior_latents

        return load_prior_latents(cfg, base, Path(cfg.output.out), device, report)

    return prepare_setup(cfg, base, concept, handle_names, accelerator, report, load_prior, optimizer_name, inputs)


def prepare_setup(cfg: Config, base: BaseModel, concept: ConceptImage, handle_names: list[str],
                  accelerator: AcceleratorLike, report: ProgressFn,
                  load_prior: Callable[[torch.device], torch.Tensor], optimizer_name: str,
                  inputs: dict[str, Any] | None = None) -> Setup:
    """Freeze the base, add handles and mask encoder, install capture, encode the photo once.

    ``lowmcgm estimate`` calls this too, on models built from their configs with fake CUDA tensors
    (a random photo, a stand-in accelerator, random class latents): the memory it reports is this code's.
    ``optimizer_name`` is the optimizer to train with: ``choose_optimizer``'s choice, which ``train``
    makes before weights load (the estimate passes the one it traces); ``inputs`` the fingerprints of
    what the run reads (``runs.identity.input_fingerprints``), kept in its checkpoints.
    """
    device = accelerator.device
    weight_dtype = precision_dtype(accelerator.mixed_precision)
    resolution = concept.image.shape[-1]
    mcgm = MCGMState.install(base, handle_names, list(cfg.data.init_words), cfg.loss.use_mask_tokens,
                             cfg.train.seed, device, cfg.loss.mask_encoder_input, cfg.loss.mask_token_norm)

    if cfg.model.use_xformers:
        _enable_xformers(base, report)
    store = CrossAttentionStore() if cfg.loss.use_attention_loss else None
    capture = None
    # Capture goes in before checkpointing is switched on, so recomputation runs the same processors.
    if store is not None:
        latent_px = resolution // base.vae_scale_factor
        capture = install_capture(base.unet, loss_layer_names(base.unet, cfg.loss.attn_loss_downscale, latent_px),
                                  store)
    if cfg.model.use_gradient_checkpointing:
        checkpoint_unet(base.unet)
    base.unet.train()
    if cfg.model.text_encoder_checkpointing:
        for encoder in base.text_encoders:
            checkpoint_text_encoder(encoder)

    if cfg.lora.phase2_mode == "full":
        weight_dtype = torch.float32  # every UNet weight will train: fp32 master weights
    # The photo is encoded before the UNet and text encoder arrive, so the encoder's activations
    # (about 0.6 GiB at 512 px) never sit on top of them: `lowmcgm estimate` found this setup peak
    # above the training steps' own. The VAE is cast while it moves: no fp32 copy on the GPU.
    if weight_dtype == torch.float32 or base.family.vae_needs_fp32(base):
        base.vae.to(device)  # diffusers warns whenever a dtype is passed
    else:
        base.vae.to(device, weight_dtype)
    mean, std = encode_photo(base, concept.image, device)
    for module in [base.unet, *base.text_encoders]:
        cast_frozen(module, weight_dtype)
        # Stored in fp8 on the CPU, so the GPU never holds the half-precision copy. The text encoders
        # only with their checkpointing (the config refuses fp8 without it): the handles' gradients
        # pass through them, and un-checkpointed autograd keeps every layer's upcast copy (`lowmcgm
        # estimate`: SDXL's phase 1 went from 5.2 to 5.9 GiB that way).
        in_fp8 = cfg.model.fp8_base if module is base.unet else cfg.model.fp8_text_encoders
        if in_fp8:
            store_in_fp8(module, weight_dtype)
        module.to(device)
    mcgm.to(device)
    if mcgm.mask_encoder is not None and cfg.loss.mask_token_norm == "layernorm":
        mcgm.mask_encoder.init_output_scale(measure_handle_rms(base, mcgm, device))
    prior = load_prior(device) if cfg.train.use_prior_preservation else None
    if cfg.model.use_vae_offload and cfg.data.background == "keep":
        base.vae.to("cpu")  # the photo is encoded: the VAE's memory is free for activations
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return Setup(cfg, base, concept, mcgm, store, accelerator, mean, std, prior, report, capture=capture,
                 time_ids=photo_time_ids(base, concept), inputs=inputs or {}, optimizer_name=optimizer_name)


def photo_time_ids(base: BaseModel, concept: ConceptImage) -> torch.Tensor | None:
    """The size numbers the family conditions the training photo on (SDXL's), or None."""
    side = concept.image.shape[-1]
    return base.family.photo_time_ids(base, concept.original_hw or (side, side), concept.crop_top_left, side)


@torch.no_grad()
def measure_handle_rms(base: BaseModel, mcgm: MCGMState, device: torch.device) -> torch.Tensor:
    """RMS of the text-encoder states at the handles' positions in the prompt naming them all: the
    scale of the context rows the mask tokens sit beside (0-d tensor, kept on ``device``)."""
    ids = tokenize_prompts(base, [build_prompt(mcgm.handle_names)])
    states = encode_prompt_ids(base, ids, device).context  # (1, 77, d)
    where = handle_positions(ids.ids.to(device), mcgm.handles.handle_ids.to(device)[None])  # (1, K)
    return compute_token_rms(states.gather(1, where[..., None].expand(-1, -1, states.shape[-1])))


def _mixed_precision(cfg: Config, report: ProgressFn) -> str:
    if cfg.model.mixed_precision != "no" and not torch.cuda.is_available():
        report({"kind": "message", "level": "info",
                "text": "No CUDA device: training in fp32 on the CPU (half precision is ~100x slower there)."})
        return "no"
    return cfg.model.mixed_precision


def _enable_xformers(base: BaseModel, report: ProgressFn) -> None:
    try:
        base.unet.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # missing module, no CUDA, or a wheel built for another torch
        report({"kind": "message", "level": "warning", "text": f"xformers unavailable ({exc}); using SDPA."})


def _say_info(report: ProgressFn) -> Callable[[str], None]:
    return lambda text: report({"kind": "message", "level": "info", "text": text})


def _say_on_main_process(report: ProgressFn) -> Callable[[str], None]:
    """``_say_info`` on the main process only: under ``accelerate launch`` every process runs
    ``train``, before its accelerator exists (``PartialState`` knows the process already)."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return lambda text: None
    return _say_info(report)


