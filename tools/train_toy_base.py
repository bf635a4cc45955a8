"""Train the toy base model: a tiny Stable Diffusion (same classes) learnt from toy-world scenes.

Stages, run one after the other into the same ``--out`` folder::

    python tools/train_toy_base.py --stage vae  --out runs/toy --device cuda
    python tools/train_toy_base.py --stage unet --out runs/toy --device cuda
    python tools/eval_toy_base.py --model runs/toy/model

- ``vae``: AutoencoderKL on rendered scenes (L1 + MSE, foreground pixels weighted 5x, tiny KL).
  At the end (and at every checkpoint) the latent scaling factor is measured (1 / latent std).
- ``unet``: CLIPTextModel and UNet2DConditionModel trained jointly on captions, VAE frozen;
  v-prediction on a scaled-linear DDPM schedule rescaled to zero terminal SNR (sampled with
  ``timestep_spacing="trailing"``; ``--leaky-schedule``: epsilon on the plain schedule, as runs up
  to step 8249 were), 10% caption dropout, min-SNR-5 loss weighting (faster convergence on small
  latents), optional EMA. Without zero terminal SNR the background followed the seed, not the
  caption (``tools/probe_noise_leak.py``; docs/benchmarks.md).
- ``export``: rewrite ``<out>/model`` from the checkpoints (each stage also does it at the end).

Resolution choice: 64x64 images, a 2x VAE (two blocks) to 32x32x4 latents, and a three-level
UNet (32, 16, 8) with cross-attention at 16x16 and 8x8. The method's attention losses read the
16x16 maps (``down_blocks.1``/``up_blocks.1``: latent side / 2, so lowmcgm's attention-loss
downscale is 2 for this model; ``toyworld.json`` in the model folder records it). The other
option, 128x128 images with a 4x VAE, gives the same UNet cost but a 4x costlier VAE that also
compresses 12x instead of 3x (the feasibility probe's 4x VAE stalled near 26 dB PSNR), and
64 px with a 4x VAE leaves only 4x4 or 16x16-without-downsampling maps.

Presets: ``tiny`` (tests), ``small`` (CPU: UNet (32, 64, 64), 2.6 M parameters) and ``base``
(GPU: UNet (64, 128, 128), 10 M; about 23 MB in fp16 with VAE and text encoder). Measured on
one CPU thread (fwd + bwd + AdamW on an idle core / whole steps on a core shared with other
jobs): ``small`` VAE batch 8 0.53 / 0.85 s, UNet batch 16 1.05 / 2.8 s; ``base`` VAE batch 16
about 4 s and UNet batch 64 about 21 s per whole step on the shared core.

Where a CPU step goes (``small``, batch 16, one thread, idle core, measured by timing each part
of 10 steps after 2 warm-up steps): rendering 16 scenes 0.04 s (2.5%), VAE encoding 0.11 s (7%),
text encoder + UNet forward 0.45 s, backward 0.89 s (88% together), AdamW 0.03 s, EMA 0.008 s;
1.53 s in all. Caching latents or rendering in a worker could save at most ~10%, so neither is
done. bf16 autocast (1.38 vs 1.30 s for forward + backward) and channels-last (1.36 s) are slower
on this CPU; two threads instead of one: 0.96 s (1.35x), the better choice when nothing else runs,
while one thread at a nice level is the one that leaves the other core to other work.

Reproducible and resumable: the batch of step ``s`` is drawn from ``default_rng([seed, stage, s])``
and noise from a generator seeded the same way, so a resumed run sees the data it would have seen.
Checkpoints are weights only (safetensors, step and config in the header), written to a temporary
name and renamed, every ``--checkpoint-every`` steps, at ``--max-minutes``, on Ctrl-C and on
SIGTERM. Optimizer moments are not saved (weights-only by design): on resume AdamW restarts and
the learning rate ramps up again over ``REWARM_STEPS`` steps so fresh moments do not jolt the
weights. The model folder is saved in fp16 in the StableDiffusionPipeline layout, without safety
checker or feature extractor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.models.tokenizer import build_clip_tokenizer  # noqa: E402
from lowmcgm.toy.scenes import (  # noqa: E402
    HELDOUT_COMBOS,
    VOCABULARY,
    caption,
    caption_variant,
    render_scene,
    sample_scene,
)

# Words beyond the captions: the prompts lowmcgm writes ("a photo of <asset0> at the beach").
EXTRA_WORDS = ("at", "with", "an", "toy")
STAGE_IDS = {"vae": 1, "unet": 2}
REWARM_STEPS = 20
CHECKPOINT_FORMAT = "lowmcgm-toy-base/1"
# The attention-loss maps sit at latent side / 2 in this three-level UNet (see module docstring).
ATTN_LOSS_DOWNSCALE = 2


@dataclass(frozen=True)
class ToyConfig:
    """Architecture and training settings; architecture fields must not change on resume."""

    image_size_px: int = 64
    vae_channels: tuple[int, ...] = (32, 64)
    vae_layers_per_block: int = 2
    vae_norm_groups: int = 8
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 2
    unet_norm_groups: int = 16
    unet_heads: int = 8
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    # Training (free to change between runs).
    vae_batch: int = 16
    vae_lr: float = 5e-4
    vae_steps: int = 6000
    kl_weight: float = 1e-4
    fg_weight: float = 5.0
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_steps: int = 30000
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    # Vary the wording of captions (pose words present or not, place first, last or absent) so
    # lowmcgm's prompts ("a photo of <asset0> on the beach") are in distribution.
    caption_variants: bool = True
    snr_gamma: float = 5.0
    # Zero terminal SNR (Lin et al. 2024) with v-prediction. The scaled-linear schedule leaves
    # sqrt(alpha_bar) = 0.068 at t = 999: on 32x32 latents the image's low frequencies (the
    # background) survive the noise, the model learns to read them off its input at every t, and at
    # sampling the seed's low frequencies pick the background instead of the caption (measured by
    # tools/probe_noise_leak.py on the step-8249 model: the x0 prediction at t = 999 followed the
    # noised image's background 34 times in 64, the caption's 7). Epsilon cannot be predicted at
    # zero SNR, hence v.
    zero_terminal_snr: bool = True
    ema_decay: float = 0.999
    use_holdout: bool = True
    seed: int = 0

    ARCHITECTURE = ("image_size_px", "vae_channels", "vae_layers_per_block", "vae_norm_groups",
                    "unet_channels", "unet_layers_per_block", "unet_norm_groups", "unet_heads",
                    "text_hidden", "text_layers", "text_heads")


PRESETS = {
    # For tests: every stage runs in well under a second per step.
    "tiny": dict(vae_channels=(8, 16), vae_layers_per_block=1, vae_norm_groups=4,
                 unet_channels=(8, 16, 16), unet_layers_per_block=1, unet_norm_groups=4,
                 unet_heads=2, text_hidden=16, text_layers=1, text_heads=2, vae_batch=2,
                 unet_batch=2, warmup_steps=2, vae_steps=10, unet_steps=10, ema_decay=0.9),
    # For CPU runs: 2.6 M UNet parameters.
    "small": dict(vae_layers_per_block=1, unet_channels=(32, 64, 64), vae_batch=8, unet_batch=16,
                  vae_steps=5000, unet_steps=15000),
    # For a GPU: 10 M UNet parameters, about 22 MB in fp16 all parts together.
    "base": {},
}


# ----------------------------------------------------------------------------------------------
# Models.

def build_tokenizer():
    return build_clip_tokenizer(list(VOCABULARY) + list(EXTRA_WORDS))


def build_vae(cfg: ToyConfig, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.vae_layers_per_block, norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size_px, scaling_factor=scaling_factor,
        # Self-attention over 32x32 latents costs more than it helps on two-tone scenes.
        mid_block_add_attention=False, force_upcast=False,
    )


def build_text_encoder(cfg: ToyConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=cfg.text_hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(cfg: ToyConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size_px(cfg), in_channels=4, out_channels=4,
        layers_per_block=cfg.unet_layers_per_block, block_out_channels=cfg.unet_channels,
        norm_num_groups=cfg.unet_norm_groups,
        # No attention at full latent size (1024 tokens): the loss maps live one level down.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads,
    )


def latent_size_px(cfg: ToyConfig) -> int:
    """Latent side: the image side over the VAE's 2 ** (blocks - 1) downscale."""
    return cfg.image_size_px // 2 ** (len(cfg.vae_channels) - 1)


def build_scheduler(cfg: ToyConfig):
    """The model's noise schedule; saved with it, so every sampler of the model follows it."""
    from diffusers import DDPMScheduler

    zero_snr = cfg.zero_terminal_snr
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction" if zero_snr else "epsilon",
                         rescale_betas_zero_snr=zero_snr,
                         # With zero SNR the first sampling step must be t = 999 (no signal).
                         timestep_spacing="trailing" if zero_snr else "leading",
                         steps_offset=1, clip_sample=False)


# ----------------------------------------------------------------------------------------------
# Data.

def step_rng(cfg: ToyConfig, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, STAGE_IDS[stage], step])


def step_generator(cfg: ToyConfig, stage: str, step: int) -> torch.Generator:
    seed = int(step_rng(cfg, stage, step).integers(2**62))
    return torch.Generator("cpu").manual_seed(seed)


def render_batch(rng: np.random.Generator, n: int, size_px: int, holdout: bool,
                 wording_rng: np.random.Generator | None = None):
    """n scenes as (n, 3, S, S) float in [-1, 1] and their captions.

    With ``wording_rng`` each caption's wording (pose words, place) is drawn from it
    (``caption_variant``); without, every caption is the canonical one. A separate generator keeps
    the scenes themselves the same with and without variants.
    """
    images, texts = [], []
    for _ in range(n):
        scene = sample_scene(rng, exclude=HELDOUT_COMBOS if holdout else None)
        image, _ = render_scene(scene, size_px)
        images.append(image)
        texts.append(caption_variant(scene, wording_rng) if wording_rng else caption(scene))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, texts


class StepBatches(torch.utils.data.IterableDataset):
    """Batches of steps ``start..total-1`` in order, each drawn from its own step's generator.

    With DataLoader workers, worker w renders steps w, w + n, ...; the DataLoader reads workers
    round-robin, so batches still arrive in step order and match a run without workers. On a
    GPU, rendering on one core would otherwise be the bottleneck.
    """

    def __init__(self, cfg: ToyConfig, stage: str, start: int, total: int) -> None:
        self.cfg, self.stage, self.start, self.total = cfg, stage, start, total

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # workers only render; leave the trainer's threads alone
        batch = self.cfg.vae_batch if self.stage == "vae" else self.cfg.unet_batch
        for step in range(self.start + worker, self.total, workers):
            rng = step_rng(self.cfg, self.stage, step)
            wording = (np.random.default_rng([self.cfg.seed, STAGE_IDS[self.stage], step, 1])
                       if self.cfg.caption_variants and self.stage == "unet" else None)
            x, texts = render_batch(rng, batch, self.cfg.image_size_px, self.cfg.use_holdout,
                                    wording)
            if self.stage == "unet":
                drop = rng.random(len(texts)) < self.cfg.caption_dropout
                texts = ["" if d else t for d, t in zip(drop, texts)]
            yield step, x, texts


def make_batches(cfg: ToyConfig, stage: str, start: int, total: int, workers: int):
    dataset = StepBatches(cfg, stage, start, total)
    if workers <= 0:
        return iter(dataset)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                            prefetch_factor=4, persistent_workers=False))


# ----------------------------------------------------------------------------------------------
# Checkpoints.

def checkpoint_path(out: Path, stage: str) -> Path:
    return out / "checkpoints" / f"{stage}.safetensors"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Weights-only safetensors, written under a temporary name and renamed: no half files."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    cpu = {k: (v.float() if v.is_floating_point() else v).detach().to("cpu").contiguous()
           for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata={"format": CHECKPOINT_FORMAT,
                                       **{k: json.dumps(v) for k, v in meta.items()}})
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"{path} is not a toy-base checkpoint (format {raw.get('format')!r}).")
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    return load_file(str(path)), meta


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def config_from_meta(meta: dict) -> ToyConfig:
    fields = {f.name for f in dataclasses.fields(ToyConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()
              if k in fields}
    # Checkpoints from before the field existed were trained on the leaky schedule.
    values.setdefault("zero_terminal_snr", False)
    return ToyConfig(**values)


def check_architecture(cfg: ToyConfig, saved: ToyConfig, path: Path) -> None:
    diff = [k for k in ToyConfig.ARCHITECTURE if getattr(cfg, k) != getattr(saved, k)]
    if diff:
        raise SystemExit(f"{path} was trained with another architecture ({', '.join(diff)}); "
                         "use the same --preset or another --out.")


# ----------------------------------------------------------------------------------------------
# Training loop pieces.

def learning_rate(base_lr: float, step: int, total: int, warmup: int, resumed_at: int) -> float:
    """Linear warmup, cosine decay to 10%, and a short ramp after a resume (fresh AdamW moments)."""
    if step < warmup:
        lr = base_lr * (step + 1) / warmup
    else:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        lr = base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    if resumed_at > 0:
        lr *= min(1.0, (step - resumed_at + 1) / REWARM_STEPS)
    return lr


class StopFlag:
    """Set by SIGTERM or a first Ctrl-C and checked between steps, so the run stops cleanly.

    A second Ctrl-C raises KeyboardInterrupt at once (the loop still saves). Handling SIGINT here,
    rather than relying on KeyboardInterrupt, also covers runs started in the background by a
    non-interactive shell, where Python inherits SIGINT as ignored.
    """

    def __init__(self) -> None:
        self.stop = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print(f"signal {signum}: stopping after this step (Ctrl-C again to stop now)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def vae_loss(vae, x: torch.Tensor, cfg: ToyConfig, generator: torch.Generator) -> torch.Tensor:
    """L1 + MSE with foreground pixels weighted ``fg_weight``, plus ``kl_weight`` KL per element."""
    posterior = vae.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    z = posterior.mean + posterior.std * noise
    recon = vae.decode(z).sample
    # Pixels unlike their row's median colour are (mostly) subjects: the cheap foreground weight
    # keeps limbs from blurring into the background.
    median = x.median(dim=3, keepdim=True).values
    fg = ((x - median).abs().sum(dim=1, keepdim=True) > 0.15).float()
    weight = 1.0 + (cfg.fg_weight - 1.0) * fg
    d = recon - x
    rec = (weight * (d.abs() + d.pow(2))).mean()
    kl = posterior.kl().sum() / posterior.mean.numel()
    return rec + cfg.kl_weight * kl


@torch.no_grad()
def measure_scaling_factor(vae, cfg: ToyConfig, device: str, n: int = 256) -> float:
    rng = np.random.default_rng([cfg.seed, 99, 0])
    stds = []
    for start in range(0, n, 32):
        x, _ = render_batch(rng, min(32, n - start), cfg.image_size_px, cfg.use_holdout)
        stds.append(vae.encode(x.to(device)).latent_dist.mean.float().flatten())
    return float(1.0 / torch.cat(stds).std().item())


@torch.no_grad()
def measure_psnr(vae, cfg: ToyConfig, device: str, n: int = 64) -> float:
    """Reconstruction PSNR (dB, 8-bit) on held-out scenes (a seed stream training never reads)."""
    rng = np.random.default_rng([cfg.seed, 98, 0])
    values = []
    for start in range(0, n, 32):
        x, _ = render_batch(rng, min(32, n - start), cfg.image_size_px, holdout=False)
        x = x.to(device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - x) * 127.5).pow(2).flatten(1).mean(1)
        values += (10 * torch.log10(255.0**2 / mse.clamp_min(1e-8))).tolist()
    return float(np.mean(values))


def compute_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction;
    for v-prediction SNR + 1 takes SNR's place (as diffusers' training scripts do), which also
    keeps the weight finite and non-zero at zero terminal SNR."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    if scheduler.config.prediction_type == "v_prediction":
        snr = snr + 1
    return torch.clamp(snr, max=gamma) / snr


def encode_prompts(tokenizer, text_encoder, texts: list[str], device: str) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]  # (B, 77, text_hidden)


# ----------------------------------------------------------------------------------------------
# Stages.

def _autocast(device: str):
    # bf16 autocast on GPUs (weights stay fp32); plain fp32 on CPU.
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def run_vae(cfg: ToyConfig, args, out: Path) -> dict:
    path = checkpoint_path(out, "vae")
    vae = build_vae(cfg)
    start, meta = 0, {}
    if path.exists():
        tensors, meta = load_checkpoint(path)
        check_architecture(cfg, config_from_meta(meta), path)
        vae.load_state_dict(_unprefixed("vae", tensors))
        start = int(meta["step"])
    vae.to(args.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    total = args.steps or cfg.vae_steps

    def save(step: int) -> None:
        vae.eval()
        factor = measure_scaling_factor(vae, cfg, args.device)
        vae.train()
        save_checkpoint(path, _prefixed("vae", vae), {"stage": "vae", "step": step,
                                                       "scaling_factor": factor,
                                                       "config": dataclasses.asdict(cfg)})

    def step_fn(step: int, x: torch.Tensor, texts: list[str]) -> float:
        with _autocast(args.device):
            loss = vae_loss(vae, x.to(args.device), cfg, step_generator(cfg, "vae", step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg.vae_lr, step, total, cfg.warmup_steps, start)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    result = _loop("vae", start, total, step_fn, save, args, out, cfg)
    vae.eval()
    result["psnr_db"] = measure_psnr(vae, cfg, args.device)
    export_model(cfg, out)
    return result


def run_unet(cfg: ToyConfig, args, out: Path) -> dict:
    vae_path = checkpoint_path(out, "vae")
    if not vae_path.exists():
        raise SystemExit(f"No VAE checkpoint at {vae_path}: run --stage vae first.")
    vae_tensors, vae_meta = load_checkpoint(vae_path)
    check_architecture(cfg, config_from_meta(vae_meta), vae_path)
    scaling = float(vae_meta["scaling_factor"])
    vae = build_vae(cfg, scaling)
    vae.load_state_dict(_unprefixed("vae", vae_tensors))
    vae.to(args.device).eval().requires_grad_(False)

    tokenizer = build_tokenizer()
    text_encoder, unet = build_text_encoder(cfg, tokenizer), build_unet(cfg)
    scheduler = build_scheduler(cfg)
    path = checkpoint_path(out, "unet")
    start, ema, ema_start = 0, None, 0
    if path.exists():
        tensors, meta = load_checkpoint(path)
        saved = config_from_meta(meta)
        check_architecture(cfg, saved, path)
        unet.load_state_dict(_unprefixed("unet", tensors))
        text_encoder.load_state_dict(_unprefixed("text_encoder", tensors))
        start = int(meta["step"])
        # An average of weights that predicted another target would drag the export back.
        same_target = saved.zero_terminal_snr == cfg.zero_terminal_snr
        if cfg.ema_decay > 0 and same_target and any(k.startswith("ema.") for k in tensors):
            ema = {k[4:]: v.float().to(args.device) for k, v in tensors.items() if k.startswith("ema.")}
        elif not same_target:
            ema_start = start
            print(f"unet: switching the noise schedule at step {start} "
                  f"(zero terminal SNR {saved.zero_terminal_snr} -> {cfg.zero_terminal_snr}); "
                  "EMA restarts", flush=True)
    unet.to(args.device).train()
    text_encoder.to(args.device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    total = args.steps or cfg.unet_steps

    def live_weights() -> dict[str, torch.Tensor]:
        return {**_prefixed("unet", unet), **_prefixed("text_encoder", text_encoder)}

    if cfg.ema_decay > 0 and ema is None:
        # Float tensors only: averaging integer buffers could round them down.
        ema = {k: v.detach().clone().float() for k, v in live_weights().items()
               if v.is_floating_point()}

    def save(step: int) -> None:
        tensors = live_weights()
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.items()})
        save_checkpoint(path, tensors, {"stage": "unet", "step": step, "scaling_factor": scaling,
                                        "config": dataclasses.asdict(cfg)})

    def step_fn(step: int, x: torch.Tensor, texts: list[str]) -> float:
        gen = step_generator(cfg, "unet", step)
        with torch.no_grad():
            posterior = vae.encode(x.to(args.device)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=gen).to(args.device)
            latents = (posterior.mean + posterior.std * eps) * scaling
        noise = torch.randn(latents.shape, generator=gen).to(args.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(texts),), generator=gen)
        t = t.to(args.device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = (scheduler.get_velocity(latents, noise, t)
                  if scheduler.config.prediction_type == "v_prediction" else noise)
        with _autocast(args.device):
            context = encode_prompts(tokenizer, text_encoder, texts, args.device)
            pred = unet(noisy, t, context).sample
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * compute_snr_weights(scheduler, t, cfg.snr_gamma)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg.unet_lr, step, total, cfg.warmup_steps, start)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            # Short runs would otherwise export weights still close to the random start.
            decay = min(cfg.ema_decay, (1 + step - ema_start) / (10 + step - ema_start))
            with torch.no_grad():
                live = live_weights()
                for k, v in ema.items():
                    v.mul_(decay).add_(live[k].float(), alpha=1 - decay)
        return loss.item()

    result = _loop("unet", start, total, step_fn, save, args, out, cfg)
    export_model(cfg, out)
    return result


def _loop(stage: str, start: int, total: int, step_fn, save, args, out: Path,
          cfg: ToyConfig) -> dict:
    """Run steps start..total-1; checkpoint every N steps, at the time limit, on Ctrl-C/SIGTERM."""
    log_path = out / f"log_{stage}.jsonl"
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    step, losses, t0, reason = start, [], time.monotonic(), "done"
    batches = make_batches(cfg, stage, start, total, args.workers)
    with StopFlag() as flag, open(log_path, "a") as log:
        try:
            for batch_step, x, texts in batches:
                assert batch_step == step, (batch_step, step)  # data order is part of resuming
                losses.append(step_fn(step, x, texts))
                step += 1
                if step % args.log_every == 0 or step == total:
                    rate = (time.monotonic() - t0) / (step - start)
                    record = {"stage": stage, "step": step, "loss": float(np.mean(losses)),
                              "s_per_step": rate}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    print(f"{stage} step {step}/{total} loss {record['loss']:.4f} "
                          f"{rate:.2f} s/step", flush=True)
                    losses = []
                if step % args.checkpoint_every == 0 and step < total:
                    save(step)
                if flag.stop or time.monotonic() > deadline:
                    reason = "stopped by signal" if flag.stop else "time limit"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
        save(step)
    elapsed = time.monotonic() - t0
    print(f"{stage}: stopped at step {step} ({reason}); checkpoint {checkpoint_path(out, stage)}",
          flush=True)
    return {"stage": stage, "start_step": start, "end_step": step, "reason": reason,
            "s_per_step": elapsed / max(1, step - start)}


# ----------------------------------------------------------------------------------------------
# Export.

def export_model(cfg: ToyConfig, out: Path) -> Path:
    """Write ``<out>/model`` in fp16 from the checkpoints (VAE only until the UNet has one).

    Fresh modules are built for the export so the live training weights are never cast in place.
    """
    from diffusers import StableDiffusionPipeline

    vae_tensors, vae_meta = load_checkpoint(checkpoint_path(out, "vae"))
    unet_path = checkpoint_path(out, "unet")
    vae = build_vae(cfg, float(vae_meta["scaling_factor"]))
    vae.load_state_dict(_unprefixed("vae", vae_tensors))
    target, tmp = out / "model", out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    info = {"image_size_px": cfg.image_size_px, "attn_loss_downscale": ATTN_LOSS_DOWNSCALE,
            "attn_map_px": latent_size_px(cfg) // ATTN_LOSS_DOWNSCALE,
            "vae_step": int(vae_meta["step"]), "unet_step": None, "seed": cfg.seed,
            "heldout_combos": [list(c) for c in HELDOUT_COMBOS] if cfg.use_holdout else [],
            "config": dataclasses.asdict(cfg)}
    if unet_path.exists():
        tensors, meta = load_checkpoint(unet_path)
        ema = _unprefixed("ema", tensors)
        weights = {**{k: v for k, v in tensors.items() if not k.startswith("ema.")}, **ema}
        tokenizer = build_tokenizer()
        text_encoder, unet = build_text_encoder(cfg, tokenizer), build_unet(cfg)
        unet.load_state_dict(_unprefixed("unet", weights))
        text_encoder.load_state_dict(_unprefixed("text_encoder", weights))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            # The schedule the weights were trained on, whatever --preset says now.
            scheduler=build_scheduler(config_from_meta(meta)), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
        info["unet_step"] = int(meta["step"])
        info["weights"] = "ema" if ema else "live"
    else:
        vae.to(torch.float16).save_pretrained(tmp / "vae", safe_serialization=True)
    (tmp / "toyworld.json").write_text(json.dumps(info, indent=1) + "\n")
    old = out / "model.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("vae", "unet", "export"), required=True)
    p.add_argument("--out", type=Path, default=Path("runs/toy_base"), help="run folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--steps", type=int, default=None,
                   help="total steps of the stage (the schedule's length); default from preset")
    p.add_argument("--batch", type=int, default=None, help="batch size of the stage")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the stage")
    p.add_argument("--ema-decay", type=float, default=None, help="0 turns EMA off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--canonical-captions", action="store_true",
                   help="train on the canonical caption only (every pose word, place after the "
                        "first subject), as runs before caption variants did")
    p.add_argument("--leaky-schedule", action="store_true",
                   help="epsilon prediction on the plain scaled-linear schedule, as runs before "
                        "step 8249 did (its last step keeps 7%% of the image)")
    p.add_argument("--no-holdout", action="store_true",
                   help="also train on HELDOUT_COMBOS (the pose benchmark then has none unseen)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (and checkpoint) after this long")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=None,
                   help="scene-rendering processes (default: 0 on CPU, up to 8 on a GPU)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> ToyConfig:
    cfg = ToyConfig(**PRESETS[args.preset])
    changes = {}
    if args.stage in STAGE_IDS:
        if args.batch is not None:
            changes[f"{args.stage}_batch"] = args.batch
        if args.lr is not None:
            changes[f"{args.stage}_lr"] = args.lr
    if args.ema_decay is not None:
        changes["ema_decay"] = args.ema_decay
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.no_holdout:
        changes["use_holdout"] = False
    if args.canonical_captions:
        changes["caption_variants"] = False
    if args.leaky_schedule:
        changes["zero_terminal_snr"] = False
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = 0 if args.device == "cpu" else min(8, max(0, (os.cpu_count() or 1) - 2))
    cfg = make_config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # initial weights
    if args.stage == "vae":
        result = run_vae(cfg, args, args.out)
    elif args.stage == "unet":
        result = run_unet(cfg, args, args.out)
    else:
        result = {"stage": "export", "model": str(export_model(cfg, args.out))}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
