"""One training step: a batch, the forward pass with capture, the loss terms, backward and the update.

Reading order: ``train_step`` -> ``compute_step_loss``; the batch is ``batches.py``'s. The recipe
(``recipe.TrainingRecipe.step``) runs it once per step; ``lowmcgm estimate``'s tracer and the FLOP
count run this same function on fake CUDA tensors.
"""

from __future__ import annotations

import torch

from lowmcgm.data import resize_masks
from lowmcgm.errors import UserError
from lowmcgm.handles import handle_positions
from lowmcgm.losses import LossParts, compute_attention_loss, compute_masked_diffusion_loss, compute_total_loss
from lowmcgm.mask_encoder import append_mask_tokens, compute_token_rms, zero_mask_tokens
from lowmcgm.models.text_conditioning import (PromptIds, TextStates, encode_prompt_ids, tokenize_prompts,
                                              unet_added_kwargs)
from lowmcgm.training.accelerator import AcceleratorLike
from lowmcgm.training.batches import Batch, build_batch
from lowmcgm.training.checkpoints import nan_message
from lowmcgm.training.state import Setup, TextCache, TrainState


def train_step(setup: Setup, state: TrainState) -> dict[str, float]:
    """Draw a batch, forward with capture, backward, clip, step, free gradients; return the losses.

    ``lowmcgm estimate`` traces this same function on fake CUDA tensors.
    """
    acc = setup.accelerator
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    batch = build_batch(setup, state.generator)
    with acc.autocast():
        loss, parts = compute_step_loss(setup, batch, state.text_cache)
    if not torch.isfinite(loss):
        raise UserError(nan_message(setup, state))
    acc.backward(loss)
    _average_gradients(acc, params)
    acc.clip_grad_norm_(params, setup.cfg.train.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return parts.as_floats() | {"total": float(loss.detach())} | {k: float(v) for k, v in batch.token_rms.items()}


def compute_step_loss(setup: Setup, batch: Batch, text_cache: TextCache | None = None
                      ) -> tuple[torch.Tensor, LossParts]:
    """One forward pass (instance and prior samples together, as the reference) and the loss terms."""
    cfg, base, device = setup.cfg, setup.base, setup.device
    size, k = batch.handle_ids.shape
    input_ids = batch.prompt_ids.ids.to(device)
    masks = batch.masks.to(device)
    text = encode_text(setup, batch.prompt_ids, text_cache)  # (B, 77, d); the CPU ids: a cache lookup needs no sync
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
        prior_text = encode_text(setup, tokenize_prompts(base, [cfg.train.class_prompt] * size), text_cache)
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


def encode_text(setup: Setup, ids: PromptIds, text_cache: TextCache | None = None) -> TextStates:
    """(B, 77) token ids -> (B, 77, d) text-encoder states, and SDXL's pooled ones (from
    ``text_cache``, the phase's ``TrainState.text_cache``, when there is one)."""
    if text_cache is None:
        return encode_prompt_ids(setup.base, ids, setup.device)
    return TextStates.stack([text_cache[ids.key(row)] for row in range(len(ids))])


def _average_gradients(acc: AcceleratorLike, params: list[torch.nn.Parameter]) -> None:
    # Several processes (accelerate launch): average gradients by hand, since the trainables span
    # the UNet, the text encoder and the mask encoder and no single module could be DDP-wrapped.
    if acc.num_processes == 1:
        return
    for param in params:
        if param.grad is not None:
            param.grad = acc.reduce(param.grad, reduction="mean")
