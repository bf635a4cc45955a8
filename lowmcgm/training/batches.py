"""One training step's batch: which concepts, flipped or moved how, at which noise level.

``build_batch`` draws, on the CPU and from the run's own generator, everything random in a step:
union sampling of the concepts (k drawn once per step so samples stack), flips, affine moves of
photo and masks together, mask dropout and perturbation for the mask encoder, noise, timesteps
and prior-preservation samples. It starts from the photo's latents, encoded once by
``encode_photo``; the forward pass and the loss are the step's (``step.compute_step_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowmcgm.data import (apply_affine, build_encoder_masks, build_prompt, draw_affine, sample_concepts,
                          sample_num_concepts, solid_background)
from lowmcgm.models.base import BaseModel
from lowmcgm.models.text_conditioning import PromptIds, tokenize_prompts
from lowmcgm.training.state import Setup


@dataclass
class Batch:
    """One step's inputs, drawn on the CPU; ``compute_step_loss`` moves them to the device."""

    prompt_ids: PromptIds  # (B, 77) from each tokenizer
    handle_ids: torch.Tensor  # (B, k) token id of each selected handle, in prompt order
    masks: torch.Tensor  # (B, k, R, R) selected masks, flipped (and moved) with the photo
    latents: torch.Tensor  # (B, C, h, w) scaled latents
    noise: torch.Tensor
    timesteps: torch.Tensor  # (B,)
    prior_latents: torch.Tensor | None = None  # (B, C, h, w)
    prior_noise: torch.Tensor | None = None
    prior_timesteps: torch.Tensor | None = None
    # (B, k, m, m) what the mask encoder reads when it differs from ``masks`` (mask dropout or
    # perturbation: data.mask_dropout, data.use_mask_perturbation); None: ``masks`` themselves.
    encoder_masks: torch.Tensor | None = None
    # Filled by compute_step_loss: RMS of the mask tokens and of the handles' text states.
    token_rms: dict[str, torch.Tensor] = field(default_factory=dict)


def build_batch(setup: Setup, generator: torch.Generator) -> Batch:
    """Union sampling and flips for each sample; k is drawn once per step so batches stack."""
    cfg, base, concept = setup.cfg, setup.base, setup.concept
    size = cfg.train.batch_size
    k = sample_num_concepts(concept.num_concepts, generator)
    d, encoder = cfg.data, setup.mcgm.mask_encoder
    perturbation = d.mask_perturbation if d.use_mask_perturbation else 0.0
    own_encoder_input = encoder is not None and (d.mask_dropout > 0 or perturbation > 0)
    prompts, handle_ids, masks, latents, encoder_masks = [], [], [], [], []
    for _ in range(size):
        chosen = sample_concepts(concept.num_concepts, k, generator)
        flip = bool(torch.rand(1, generator=generator) < d.flip_p)
        sample_masks = concept.masks[chosen]  # (k, R, R)
        image = concept.image
        if flip:
            sample_masks, image = sample_masks.flip(-1), image.flip(-1)
        mean, std = setup.latent_mean[int(flip)], setup.latent_std[int(flip)]
        if d.use_affine_augmentation:
            # One draw moves photo and masks alike (normalised coordinates: any resolution). With a
            # kept background the photo is encoded once, so its latents move, not its pixels:
            # encoding every moved photo would keep the VAE on the GPU (no use_vae_offload) and add
            # an encoder pass per sample. SD latents are local (one per 8x8 pixels), so a moved
            # latent decodes to the moved photo, blurred slightly where the move is not a whole
            # latent pixel. A solid background encodes each sample anyway: there the pixels move.
            theta = draw_affine(sample_masks, generator, d.affine_shift, d.affine_scale_min,
                                d.affine_scale_max, d.affine_rotate_deg)
            sample_masks = (apply_affine(sample_masks, theta, padding="zeros") > 0.5).float()
            if d.background == "solid":
                image = apply_affine(image, theta)
            else:
                mean, std = apply_affine(mean, theta), apply_affine(std, theta)
        prompts.append(build_prompt([setup.mcgm.handle_names[i] for i in chosen]))
        handle_ids.append([setup.mcgm.handles.handle_ids[i].item() for i in chosen])
        masks.append(sample_masks)
        if d.background == "solid":
            image = solid_background(image, sample_masks.amax(0), generator)
            mean, std = (t[0] for t in encode_photo(base, image, setup.device, both_flips=False))
        latents.append(mean + std * torch.randn(mean.shape, generator=generator))
        if own_encoder_input:
            encoder_masks.append(build_encoder_masks(sample_masks, encoder.mask_size, d.mask_dropout,
                                                     perturbation, generator))
    scaled = torch.stack(latents) * base.vae.config.scaling_factor
    batch = Batch(
        prompt_ids=tokenize_prompts(base, prompts), handle_ids=torch.tensor(handle_ids), masks=torch.stack(masks),
        latents=scaled, noise=torch.randn(scaled.shape, generator=generator),
        timesteps=torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (size,), generator=generator),
        encoder_masks=torch.stack(encoder_masks) if encoder_masks else None,
    )
    if setup.prior_latents is not None:
        pick = torch.randint(0, setup.prior_latents.shape[0], (size,), generator=generator)
        batch.prior_latents = setup.prior_latents[pick] * base.vae.config.scaling_factor
        batch.prior_noise = torch.randn(batch.prior_latents.shape, generator=generator)
        batch.prior_timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (size,),
                                              generator=generator)
    return batch


@torch.no_grad()
def encode_photo(base: BaseModel, image: torch.Tensor, device: torch.device,
                 both_flips: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the photo (and its mirror image), kept on the CPU.

    Returns:
        (F, C, h, w) mean and std, F = 2 with ``both_flips`` (index 1 = flipped), unscaled.
    """
    images = [image, image.flip(-1)] if both_flips else [image]
    vae, dtype = base.vae, next(base.vae.parameters()).dtype
    means, stds = [], []
    # One image at a time: the encoder's activations for one, not two, are the setup's peak (the
    # fp32 SDXL VAE at 1024 px: `lowmcgm estimate`'s setup 5.37 GiB with both, docs/benchmarks.md).
    for one in images:
        dist = vae.encode(one[None].to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)
