"""Floating-point operations of one training step: lowmcgm's presets and kohya's step, counted side
by side on the same fake-CUDA tracer, itemised (``lowmcgm.memory.flops``); and latent pose
guidance's extra compute per image.

Tables (GFLOP = 1e9 matrix-class floating-point operations: products, convolutions, attention
kernels, as ``torch.utils.flop_counter`` counts them):

- SD 1.5 at 512 px: kohya's ``train_network.py`` step at its documented low-VRAM settings
  (``lowmcgm.memory.peers``) at the rank and images per step of each lowmcgm preset beside it, and
  lowmcgm's 4gb/6gb/8gb presets per phase, with forward, backward, checkpoint recomputation, the
  attention capture and the losses apart, and the ratio to kohya at equal settings. Needs
  ``--kohya PATH`` (a kohya-ss/sd-scripts checkout, not a dependency); without it, lowmcgm alone.
- SDXL at 1024 px: kohya's ``sdxl_train_network.py`` step at its documented low-VRAM SDXL settings
  (``lowmcgm.memory.kohya_sdxl``: UNet-only LoRA, fp16, checkpointing, SDPA, cached latents and
  text-encoder outputs, 1 image/step; ``--fp8_base`` changes no FLOP count, so without it) at rank 32
  (the peer of sdxl-6gb and sdxl-8gb) and 64 (of sdxl-12gb), and the sdxl-6gb, sdxl-8gb and sdxl-12gb
  presets on the shipped ``sdxl-base`` config, with the ratio to kohya at the preset's rank. kohya's
  setup (latent and text-encoder caching) is counted apart, not in its step. Needs ``--kohya PATH``
  with the SDXL trainer; without it, lowmcgm alone.
- Sampling: one classifier-free denoising step per pose-guidance mode (SD 1.5 at 512 px, SDXL at
  1024 px), and per image at the sampler's defaults (30 steps, the first half guided).

    OMP_NUM_THREADS=1 python tools/bench_flops.py --model sd15 [--kohya PATH] [--json out.json]
    OMP_NUM_THREADS=1 python tools/bench_flops.py --model sdxl [--kohya PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

from lowmcgm.config import SampleSettings, resolve_config
from lowmcgm.memory import trace as mt
from lowmcgm.memory.estimate import build_job, config_words
from lowmcgm.memory.kohya_sdxl import SDXL_DOC_FLAGS, check_kohya_sdxl_checkout
from lowmcgm.memory.peers import KOHYA_DOC_FLAGS, check_kohya_checkout
from lowmcgm.sampling.sampler import resolve_guidance

GFLOP = 1e9
NO_MCGM_LOSSES = {"loss.use_attention_loss": False, "loss.use_mask_tokens": False}
# (label, preset, overrides, the kohya run at equal settings: rank, images per step)
SD_ROWS = [
    ("4gb", "4gb", {}, (8, 1)),
    ("4gb without attention losses and mask tokens", "4gb", NO_MCGM_LOSSES, (8, 1)),
    ("6gb", "6gb", {}, (16, 2)),
    ("8gb", "8gb", {}, (32, 4)),
]
SDXL_ROWS = [("sdxl-6gb", "sdxl-6gb", {}, (32, 1)), ("sdxl-8gb", "sdxl-8gb", {}, (32, 1)),
             ("sdxl-12gb", "sdxl-12gb", {}, (64, 1))]
GUIDANCE_MODES = ["none", "attention", "latent"]


class Model(NamedTuple):
    rows: list  # SD_ROWS or SDXL_ROWS
    base: str  # the base model the rows train and sample (estimate.resolve_model's names)
    label: str  # as the tables name it
    resolution: int  # px, sampling; training takes the preset's
    kohya: str  # the traced entry point that counts kohya's step beside it
    check: Callable  # the kohya checkout check for that step
    kohya_settings: str  # kohya's settings, after "LoRA r{rank}"
    kohya_flags: str  # the flags kohya runs with, as the footer names them


MODELS = {
    "sd15": Model(SD_ROWS, "sd15", "SD 1.5 512 px", 512, "lowmcgm.memory.flops:count_kohya", check_kohya_checkout,
                  "+TE ({modules} modules), fp16, ckpt, SDPA, cached latents, batch {batch}",
                  " ".join(KOHYA_DOC_FLAGS) + " --resolution=512, --network_dim and --train_batch_size as in each row"),
    "sdxl": Model(SDXL_ROWS, "sdxl-base", "SDXL 1024 px", 1024, "lowmcgm.memory.flops:count_kohya_sdxl",
                  check_kohya_sdxl_checkout, "UNet only ({modules} modules), fp16, ckpt, SDPA, cached latents and "
                  "text-encoder outputs, batch {batch}",
                  " ".join(SDXL_DOC_FLAGS) + " --resolution=1024, --network_dim as in each row (no --fp8_base: it "
                  "changes no FLOP count)"),
}


def describe(cfg) -> str:
    """The settings that decide compute, in a few words."""
    t = cfg.train
    images = t.batch_size * (2 if t.use_prior_preservation else 1)
    return ", ".join(config_words(cfg, batch_note=f" ({images} image{'s' * (images > 1)}/step)"))


def g(flops: float) -> str:
    return f"{flops / GFLOP:,.0f}"


def g_small(flops: float) -> str:
    """GFLOP of a small part (the capture): one decimal under 10, 0 when there is none."""
    if flops == 0:
        return "0"
    return f"{flops / GFLOP:,.1f}" if flops < 10 * GFLOP else g(flops)


def step_cells(fig: dict) -> list[str]:
    """total, forward, backward, recompute, capture, losses (GFLOP; losses as element ops)."""
    w = fig["windows"]
    return [g(fig["total_flops"]), g(w["forward"]), g(w["backward"]), g(w["recompute"]),
            g_small(fig["capture_flops"]), f"0 ({fig['losses_element_ops'] / 1e6:.2f} M el.)"
            if fig["losses_flops"] == 0 else g(fig["losses_flops"])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kohya", metavar="PATH", help="a kohya-ss/sd-scripts checkout: count its step beside lowmcgm's")
    ap.add_argument("--model", choices=tuple(MODELS), default="sd15",
                    help="SD 1.5 at 512 px or SDXL at 1024 px (each with kohya's step beside it given --kohya)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    model = MODELS[args.model]
    kohya = str(model.check(args.kohya)) if args.kohya else None  # fail before tracing
    started = time.perf_counter()

    rows = model.rows
    cfgs = [resolve_config(preset, None, over) for _, preset, over, _ in rows]
    jobs = [build_job(cfg, model.base, None) for cfg in cfgs]
    ours = mt.run_traced("lowmcgm.memory.flops:count_jobs", {"jobs": jobs}, 3600, mode="fake")["result"]
    runs = sorted({peer for *_, peer in rows if peer is not None})
    peers = {}
    if kohya:
        # SDXL's kohya step takes 1 image (--train_batch_size=1): no batch size to give it.
        kohya_runs = [{"rank": r, "resolution": 512, "batch_size": b} if args.model == "sd15"
                      else {"rank": r, "resolution": model.resolution} for r, b in runs]
        res = mt.run_traced(model.kohya, {"kohya": kohya, "runs": kohya_runs}, 3600, mode="fake")["result"]
        peers = {(r["rank"], r.get("batch_size", 1)): r for r in res}
    sampling = mt.run_traced("lowmcgm.memory.flops:count_sampling", {
        "model": model.base, "resolution": model.resolution, "modes": GUIDANCE_MODES}, 1800, mode="fake")["result"]
    wall = time.perf_counter() - started

    head = ("| configuration | settings | phase | total | forward | backward | recompute | attention capture "
            "| losses | ratio to kohya |")
    lines = ["Training step, GFLOP (1e9 matrix-class FLOPs; backward and recompute include the "
             "capture's share; losses: matrix FLOPs, then element operations).", "", head,
             "|---" * 10 + "|"]
    for rank, batch in runs:
        if (rank, batch) in peers:
            fig = peers[(rank, batch)]
            script = "train_network.py" if args.model == "sd15" else "sdxl_train_network.py"
            settings = model.kohya_settings.format(modules=fig["lora_modules"], batch=batch)
            lines.append(f"| kohya {script}, rank {rank}, {batch} image{'s' * (batch > 1)}/step | LoRA r{rank} "
                         f"{settings} | - | " + " | ".join(step_cells(fig)) + " | - |")
    table_rows = []
    for (label, preset, over, peer), cfg, res in zip(rows, cfgs, ours):
        for ph in res["phases"]:
            ratio = ""
            if peer in peers:
                ratio = f"{ph['total_flops'] / peers[peer]['total_flops']:.3f}"
            lines.append(f"| {label} ({model.label}) | {describe(cfg)} | {ph['phase']} | " + " | ".join(step_cells(ph))
                         + f" | {ratio} |")
            table_rows.append({"label": label, "preset": preset, "overrides": over, "settings": describe(cfg),
                               "model": model.label, "kohya_peer": peer, "ratio_to_kohya": float(ratio) if ratio else None,
                               **ph})

    sample = resolve_guidance(SampleSettings(pose_guidance="latent"))  # the sampler's defaults, 0s written out
    steps, guided = sample.steps, sample.pose_guidance_steps
    lines += ["", f"Sampling, GFLOP per denoising step (classifier-free guidance: the UNet on 2 rows) and per "
                  f"image at {steps} steps, {guided} guided, plus the VAE decode:", "",
              "| model | pose guidance | step (UNet) | of which backward + recompute | per image | extra per image "
              "| ratio to unguided |", "|---" * 7 + "|"]
    sampling_rows = []
    plain = next(f for f in sampling if f["mode"] == "none")
    plain_image = steps * plain["step_flops"] + plain["decode_flops"]
    for fig in sampling:
        guided_steps = guided if fig["mode"] != "none" else 0
        image = ((steps - guided_steps) * plain["step_flops"] + guided_steps * fig["step_flops"]
                 + fig["decode_flops"])
        grad = fig["windows"]["backward"] + fig["windows"]["recompute"]
        lines.append(f"| {model.base} | {fig['mode']} | {g(fig['step_flops'])} | {g(grad)} | {g(image)} | "
                     f"{g(image - plain_image)} | {image / plain_image:.2f} |")
        sampling_rows.append({"model": model.base, "mode": fig["mode"], "per_image_flops": image,
                              "extra_per_image_flops": image - plain_image, **fig})
    lines += ["", "kohya flags: " + model.kohya_flags if kohya else "kohya: not counted (no --kohya PATH)"]
    lines += [f"kohya setup, rank {r}, counted apart from its step: {g(fig['setup_flops'])} GFLOP (latent caching "
              f"{g(fig['latent_caching_flops'])}, text-encoder caching {g(fig['text_encoder_caching_flops'])})"
              for (r, _), fig in sorted(peers.items()) if "latent_caching_flops" in fig]
    lines += ["", f"Counted in {wall:.0f} s."]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"training": table_rows, "kohya": list(peers.values()),
                                               "sampling": sampling_rows, "wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
