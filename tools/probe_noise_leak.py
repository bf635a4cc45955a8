"""Does the model read the background from its noisy input, or from the caption?

For pairs of backgrounds (A, B): render scenes on A, noise them to timestep t as training does, ask
the UNet for "a photo of a dog <on/in> the B", and classify the background of the decoded x0
prediction. "follows image" counts predictions that kept A (the noise leaked it), "follows
prompt" those that drew B. A model trained on a schedule whose last step keeps signal
(scaled-linear: sqrt(alpha_bar) = 0.068 at t = 999) follows the image even at t = 999, so at
sampling the seed picks the background; with zero terminal SNR it cannot (docs/benchmarks.md).

    python tools/probe_noise_leak.py --model lowmcgm/toy/weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.toy import metrics  # noqa: E402
from lowmcgm.toy.scenes import BACKDROPS, render_scene, sample_scene  # noqa: E402

PAIRS = (("snow", "street"), ("street", "snow"), ("beach", "room"), ("grass", "street"))


def x0_prediction(scheduler, xt: torch.Tensor, out: torch.Tensor, t: int) -> torch.Tensor:
    a = scheduler.alphas_cumprod[t]
    if scheduler.config.prediction_type == "v_prediction":
        return a.sqrt() * xt - (1 - a).sqrt() * out
    return (xt - (1 - a).sqrt() * out) / a.sqrt()


@torch.no_grad()
def probe(model: Path, timesteps: list[int], n: int, seed: int) -> list[dict]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    vae, scale, sched = pipe.vae, pipe.vae.config.scaling_factor, pipe.scheduler
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        kept = drawn = 0
        for a, b in PAIRS:
            imgs = np.stack([render_scene(sample_scene(rng, n_subjects=1, backgrounds=[a]))[0] for _ in range(n)])
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
            z0 = vae.encode(x).latent_dist.mean * scale
            alpha = sched.alphas_cumprod[t]
            xt = alpha.sqrt() * z0 + (1 - alpha).sqrt() * torch.randn(z0.shape, generator=gen)
            ids = pipe.tokenizer([f"a photo of a dog {BACKDROPS[b].preposition} the {b}"] * n, padding="max_length",
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            out = pipe.unet(xt, torch.full((n,), t), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
            decoded = vae.decode(x0_prediction(sched, xt, out, t) / scale).sample
            pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            found = [metrics.classify_background(p) for p in pixels]
            kept += sum(f == a for f in found)
            drawn += sum(f == b for f in found)
        rows.append({"t": t, "sqrt_alpha_bar": float(sched.alphas_cumprod[t].sqrt()), "follows_image": kept,
                     "follows_prompt": drawn, "of": n * len(PAIRS)})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a toy model folder")
    p.add_argument("--timesteps", type=int, nargs="+", default=[999, 958, 800, 600])
    p.add_argument("--n", type=int, default=16, help="scenes per background pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = probe(args.model, args.timesteps, args.n, args.seed)
    for r in rows:
        print(f"t={r['t']} sqrt(alpha_bar)={r['sqrt_alpha_bar']:.3f}: x0 prediction's background follows the "
              f"image {r['follows_image']}/{r['of']}, the prompt {r['follows_prompt']}/{r['of']}")
    return rows


if __name__ == "__main__":
    main()
