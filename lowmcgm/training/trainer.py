"""Training: one photo and its masks -> handles, mask encoder and LoRA, in two phases.

Phase 1 trains only the handle embeddings and the mask encoder against the frozen model; phase 2
adds LoRA adapters to the UNet (optionally the text encoder) while the handles and the encoder keep
training. The recipe, and where it deviates from the reference code, is in docs/method.md.
Reading order: ``train`` -> ``run_phase`` -> ``train_step`` -> ``compute_step_loss``; the batch a
step draws is ``batches.py``'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator

from lowmcgm import config as config_mod
from lowmcgm.adapters import cast_frozen, store_in_fp8
from lowmcgm.artifact import save_artifact
from lowmcgm.attention_capture import (CrossAttentionStore, describe_loss_layers, install_capture, loss_layer_names,
                                       remove_capture)
from lowmcgm.config import Config
from lowmcgm.data import ConceptImage, build_prompt, load_concept_image, resize_masks
from lowmcgm.errors import UserError
from lowmcgm.handles import check_handle_names, handle_positions
from lowmcgm.losses import LossParts, compute_attention_loss, compute_masked_diffusion_loss, compute_total_loss
from lowmcgm.mask_encoder import append_mask_tokens, compute_token_rms, zero_mask_tokens
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.base import BaseModel
from lowmcgm.models.dtypes import precision_dtype
from lowmcgm.models.fit import check_settings_fit
from lowmcgm.models.loading import load_base_model
from lowmcgm.models.text_conditioning import (PromptIds, TextStates, encode_prompt_ids, tokenize_prompts,
                                              unet_added_kwargs)
from lowmcgm.runs.folder import RUN_FOLDERS, check_run_folder, clear_earlier_run, run_files
from lowmcgm.runs.identity import input_fingerprints
from lowmcgm.runs.output import check_output_dir, write_effective_config
from lowmcgm.runs.signals import Interrupted, route_stop_signals, signal_name
from lowmcgm.runs.write_guard import check_not_inputs, write_text_whole
from lowmcgm.training.accelerator import AcceleratorLike
from lowmcgm.training.batches import Batch, build_batch, encode_photo
from lowmcgm.training.checkpoints import (check_finite, check_resume, check_resume_base, nan_message, resume_state,
                                          save_train_checkpoint)
from lowmcgm.training.optimizer import choose_optimizer
from lowmcgm.training.phases import enter_phase
from lowmcgm.training.state import PreviewFn, ProgressFn, Setup, TrainState


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
    setup = build_setup(cfg, base, handle_names, report, optimizer_name)
    setup.inputs = inputs
    state = resume_state(setup, out) if resume else enter_phase(setup, 1)
    setup.on_preview = on_preview
    if on_preview is not None and not resume:
        on_preview(setup, state)
    try:
        with _stop_between_steps(setup):
            if state.phase == 1:
                run_phase(setup, state, report, out)
                # LoRA arrives only now (a resume inside phase 2 added it already).
                state = enter_phase(setup, 2, generator=state.generator, history=state.history)
            run_phase(setup, state, report, out)
    except _StopNow:
        report({"kind": "message", "level": "warning", "text": "Stopped mid-step: no checkpoint written; "
                "--resume continues from the last one."})
        raise
    except KeyboardInterrupt:
        if setup.accelerator.is_main_process:
            path = save_train_checkpoint(setup, state, out)
            report({"kind": "saved", "what": "checkpoint", "path": str(path)})
        raise
    path = out / cfg.output.artifact_name
    if setup.accelerator.is_main_process:
        artifact = setup.mcgm.to_artifact(base, run_meta(setup))
        check_finite(setup, state, {"handles.vectors": artifact.handle_vectors, **artifact.mask_encoder,
                                    **artifact.unet_lora, **artifact.text_encoder_lora})
        save_artifact(artifact, path, dtype=cfg.output.save_dtype)
        write_text_whole(out / "loss_history.json", json.dumps(state.history))
        report({"kind": "saved", "what": "artifact", "path": str(path)})
    setup.accelerator.wait_for_everyone()
    # Leave the base as it came (``lowmcgm run`` samples from the artifact on the same base next).
    setup.mcgm.remove(base)
    if setup.capture is not None:
        remove_capture(base.unet, setup.capture)
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


class _StopNow(Interrupted):
    """A second stop signal: stop at once, mid-step, without writing a (half-updated) checkpoint."""


@contextlib.contextmanager
def _stop_between_steps(setup: Setup) -> Iterator[None]:
    """Turn Ctrl-C, SIGTERM and SIGHUP (``signals.STOP_SIGNALS``) into a stop at the end of the current step.

    A KeyboardInterrupt raised mid-step would leave the random generator advanced by a batch that
    was never trained on, or an optimizer step half applied: the checkpoint saved then would not
    resume to the run it interrupted. So the first signal only sets ``setup.stop_requested`` and
    ``run_phase`` raises ``Interrupted`` between steps; a second one stops at once.
    """
    def on_stop(signum: int, frame: Any) -> None:
        if setup.stop_requested:
            raise _StopNow(signum)
        setup.stop_requested = signum
        setup.report({"kind": "message", "level": "info",
                      "text": f"{signal_name(signum)}: stopping after this step to save a checkpoint (Ctrl-C again: "
                              "stop now, without one)."})

    with route_stop_signals(on_stop):
        yield


def training_device() -> torch.device:
    """The device ``build_setup``'s accelerator will train on (under ``accelerate launch``, each
    process's own GPU), known before it starts."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def build_setup(cfg: Config, base: BaseModel, handle_names: list[str], report: ProgressFn,
                optimizer_name: str) -> Setup:
    """Start the accelerator, read the photo at training size, then ``prepare_setup``."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(cfg, report))
    concept, _ = load_concept_image(cfg.data.image, list(cfg.data.masks), cfg.model.resolution or base.resolution)

    def load_prior(device: torch.device) -> torch.Tensor:
        from lowmcgm.training.prior import load_prior_latents

        return load_prior_latents(cfg, base, Path(cfg.output.out), device, report)

    return prepare_setup(cfg, base, concept, handle_names, accelerator, report, load_prior, optimizer_name)


def prepare_setup(cfg: Config, base: BaseModel, concept: ConceptImage, handle_names: list[str],
                  accelerator: AcceleratorLike, report: ProgressFn,
                  load_prior: Callable[[torch.device], torch.Tensor], optimizer_name: str) -> Setup:
    """Freeze the base, add handles and mask encoder, install capture, encode the photo once.

    ``lowmcgm estimate`` calls this too, on models built from their configs with fake CUDA tensors
    (a random photo, a stand-in accelerator, random class latents): the memory it reports is this code's.
    ``optimizer_name`` is the optimizer to train with: ``choose_optimizer``'s choice, which ``train``
    makes before weights load (the estimate passes the one it traces).
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
        base.unet.enable_gradient_checkpointing()
    base.unet.train()

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
    for module in (base.unet, base.text_encoder, base.text_encoder_2):
        if module is not None:
            cast_frozen(module, weight_dtype)
            # The UNet only, cast on the CPU so the GPU never holds its half-precision copy. The text
            # encoders stay: the handles' gradients pass through them un-checkpointed, so autograd
            # would keep every layer's upcast copy (`lowmcgm estimate`: SDXL's phase 1 went from
            # 5.2 to 5.9 GiB with them in fp8 too); when they only compute, their outputs are cached.
            if cfg.model.fp8_base and module is base.unet:
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
                 time_ids=photo_time_ids(base, concept), optimizer_name=optimizer_name)


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


def encode_text(setup: Setup, ids: PromptIds) -> TextStates:
    """(B, 77) token ids -> (B, 77, d) text-encoder states, and SDXL's pooled ones (from the cache
    when there is one)."""
    if setup.text_cache is None:
        return encode_prompt_ids(setup.base, ids, setup.device)
    return TextStates.stack([setup.text_cache[ids.key(row)] for row in range(len(ids))])


def run_phase(setup: Setup, state: TrainState, report: ProgressFn, out: Path) -> None:
    """The loop: one step, report, maybe checkpoint, maybe preview."""
    cfg, acc = setup.cfg, setup.accelerator
    total = cfg.train.phase1_steps if state.phase == 1 else cfg.train.phase2_steps
    report({"kind": "phase", "phase": state.phase, "total": total, "start": state.step})
    started, start_step = time.perf_counter(), state.step
    while state.step < total:
        if setup.stop_requested:  # a stop signal: stop here, between steps, where the state is whole
            raise Interrupted(setup.stop_requested)
        losses = train_step(setup, state)
        state.step += 1
        state.history.append({"phase": state.phase, "step": state.step, **losses})
        elapsed = time.perf_counter() - started
        rate = (state.step - start_step) / elapsed if elapsed > 0 else 0.0
        report({"kind": "step", "phase": state.phase, "step": state.step, "total": total, "losses": losses,
                "it_per_s": rate, "eta_s": (total - state.step) / rate if rate else math.inf,
                "peak_bytes": _peak_memory(setup.device)})
        every = cfg.train.checkpoint_every
        if every and state.step % every == 0 and state.step < total and acc.is_main_process:
            save_train_checkpoint(setup, state, out)
        every = cfg.output.preview_every
        if setup.on_preview is not None and every and state.step % every == 0 and acc.is_main_process:
            setup.on_preview(setup, state)


def train_step(setup: Setup, state: TrainState) -> dict[str, float]:
    """Draw a batch, forward with capture, backward, clip, step, free gradients; return the losses.

    ``lowmcgm estimate`` traces this same function on fake CUDA tensors.
    """
    acc = setup.accelerator
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    batch = build_batch(setup, state.generator)
    with acc.autocast():
        loss, parts = compute_step_loss(setup, batch)
    if not torch.isfinite(loss):
        raise UserError(nan_message(setup, state))
    acc.backward(loss)
    _average_gradients(acc, params)
    acc.clip_grad_norm_(params, setup.cfg.train.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return parts.as_floats() | {"total": float(loss.detach())} | {k: float(v) for k, v in batch.token_rms.items()}


def compute_step_loss(setup: Setup, batch: Batch) -> tuple[torch.Tensor, LossParts]:
    """One forward pass (instance and prior samples together, as the reference) and the loss terms."""
    cfg, base, device = setup.cfg, setup.base, setup.device
    size, k = batch.handle_ids.shape
    input_ids = batch.prompt_ids.ids.to(device)
    masks = batch.masks.to(device)
    text = encode_text(setup, batch.prompt_ids)  # (B, 77, d); the CPU ids: a cache lookup needs no sync
    encoder = setup.mcgm.mask_encoder
    encoder_input = masks if batch.encoder_masks is None else batch.encoder_masks.to(device)
    mask_tokens = encoder(encoder_input) if encoder is not None else None  # (B, k, d)
    context = append_mask_tokens(text.context, mask_tokens)
    # Keys the losses read: each handle's position, then each mask token's (77 + i).
    key_index = handle_positions(input_ids, batch.handle_ids.to(device))
    # Token norms over training (docs/method.md): the mask tokens against the handles' states.
    batch.token_rms = {"handle_rms": compute_token_rms(
        text.context.gather(1, key_index[..., None].expand(-1, -1, text.context.shape[-1])))}
    if mask_tokens is not None:
        batch.token_rms["mask_token_rms"] = compute_token_rms(mask_tokens)
    if mask_tokens is not None:
        first = text.context.shape[1]  # the mask tokens come after the 77 text tokens
        key_index = torch.cat([key_index, first + torch.arange(k, device=device).expand(size, k)], 1)
    latents, noise, timesteps = batch.latents.to(device), batch.noise.to(device), batch.timesteps.to(device)
    if batch.prior_latents is not None:
        prior_text = encode_text(setup, tokenize_prompts(base, [cfg.train.class_prompt] * size))
        prior_context = append_mask_tokens(
            prior_text.context,
            zero_mask_tokens(size, k, base.text_width, text.context) if mask_tokens is not None else None)
        context = torch.cat([context, prior_context])
        text = TextStates.stack([text, prior_text])
        latents = torch.cat([latents, batch.prior_latents.to(device)])
        noise = torch.cat([noise, batch.prior_noise.to(device)])
        timesteps = torch.cat([timesteps, batch.prior_timesteps.to(device)])
        key_index = torch.cat([key_index, torch.zeros_like(key_index)])  # prior maps are not read

    noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
    store = setup.store
    if store is not None:
        store.begin(key_index)
    pred = base.unet(noisy.to(context.dtype), timesteps, context,
                     added_cond_kwargs=unet_added_kwargs(text, setup.time_ids)).sample
    if store is not None:
        store.end()
    if base.prediction_type == "v_prediction":
        target = base.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise

    union = resize_masks(masks.amax(1, keepdim=True), latents.shape[-1])  # (B, 1, h, w)
    rec = compute_masked_diffusion_loss(pred[:size], target[:size], union)
    zero = rec.new_zeros(())
    attn = mask_attn = zero
    if store is not None:
        maps = store.mean_maps()[:size]  # (B, S, s, s)
        small = resize_masks(masks, maps.shape[-1])  # (B, k, s, s)
        attn = compute_attention_loss(maps[:, :k], small)
        if mask_tokens is not None:
            mask_attn = compute_attention_loss(maps[:, k:], small)
        store.maps = {}  # the loss holds what it needs; drop the store's references
    prior = torch.nn.functional.mse_loss(pred[size:].float(), target[size:].float()) \
        if batch.prior_latents is not None else zero
    parts = LossParts(rec=rec, attn=attn, mask_attn=mask_attn, prior=prior)
    return compute_total_loss(parts, cfg.loss.attn_weight, cfg.loss.mask_attn_weight, cfg.loss.prior_weight), parts


def run_meta(setup: Setup) -> dict[str, Any]:
    """What the artifact records about the run besides the trained state (``MCGMState.to_artifact``)."""
    cfg, base = setup.cfg, setup.base
    return {"base_model": base.name, "base_model_hash": base.config_hash, "base_model_version": base.version_tag,
            "text_width": base.text_width, "prediction_type": base.prediction_type,
            "resolution": cfg.model.resolution or base.resolution, "init_words": list(cfg.data.init_words),
            "training_config": config_mod.config_to_dict(cfg)}


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


def _average_gradients(acc: AcceleratorLike, params: list[torch.nn.Parameter]) -> None:
    # Several processes (accelerate launch): average gradients by hand, since the trainables span
    # the UNet, the text encoder and the mask encoder and no single module could be DDP-wrapped.
    if acc.num_processes == 1:
        return
    for param in params:
        if param.grad is not None:
            param.grad = acc.reduce(param.grad, reduction="mean")


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
