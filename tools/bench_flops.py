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
- SDXL at 1024 px: the sdxl-8gb and sdxl-12gb presets on the shipped ``sdxl-base`` config (lowmcgm
  alone: ``peers.py`` traces kohya's SD 1.x step only).
- Sampling: one classifier-free denoising step per pose-guidance mode (SD 1.5 at 512 px, SDXL at
  1024 px), and per image at the sampler's defaults (30 steps, the first half guided).

    OMP_NUM_THREADS=1 python tools/bench_flops.py --model sd15 [--kohya PATH] [--json out.json]
    OMP_NUM_THREADS=1 python tools/bench_flops.py --model sdxl [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lowmcgm.config import SampleSettings, resolve_config
from lowmcgm.memory import trace as mt
from lowmcgm.memory.estimate import build_job
from lowmcgm.memory.peers import KOHYA_DOC_FLAGS, check_kohya_checkout

GFLOP = 1e9
NO_MCGM_LOSSES = {"loss.use_attention_loss": False, "loss.use_mask_tokens": False}
# (label, preset, overrides, the kohya run at equal settings: rank, images per step)
SD_ROWS = [
    ("4gb", "4gb", {}, (8, 1)),
    ("4gb without attention losses and mask tokens", "4gb", NO_MCGM_LOSSES, (8, 1)),
    ("6gb", "6gb", {}, (16, 2)),
    ("8gb", "8gb", {}, (32, 4)),
]
SDXL_ROWS = [("sdxl-8gb", "sdxl-8gb", {}, None), ("sdxl-12gb", "sdxl-12gb", {}, None)]
SAMPLING = [("sd15", 512), ("sdxl-base", 1024)]
GUIDANCE_MODES = ["none", "attention", "latent"]


def describe(cfg) -> str:
    """The settings that decide compute, in a few words."""
    m, lo, t = cfg.model, cfg.lora, cfg.train
    images = t.batch_size * (2 if t.use_prior_preservation else 1)
    what = [f"LoRA r{lo.rank}" + (" +TE" if lo.use_text_encoder_lora else ""), f"{m.mixed_precision}"]
    what += ["ckpt"] * m.use_gradient_checkpointing + ["prior"] * t.use_prior_preservation
    what += [f"batch {t.batch_size} ({images} image{'s' * (images > 1)}/step)"]
    if not cfg.loss.use_attention_loss:
        what.append("no attention loss")
    if not cfg.loss.use_mask_tokens:
        what.append("no mask tokens")
    return ", ".join(what)


def g(flops: float) -> str:
    return f"{flops / GFLOP:,.0f}"


def step_cells(fig: dict) -> list[str]:
    """total, forward, backward, recompute, capture, losses (GFLOP; losses as element ops)."""
    w = fig["windows"]
    return [g(fig["total_flops"]), g(w["forward"]), g(w["backward"]), g(w["recompute"]),
            g(fig["capture_flops"]), f"0 ({fig['losses_element_ops'] / 1e6:.2f} M el.)"
            if fig["losses_flops"] == 0 else g(fig["losses_flops"])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kohya", metavar="PATH", help="a kohya-ss/sd-scripts checkout: count its step beside lowmcgm's")
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15",
                    help="SD 1.5 at 512 px (with kohya beside it) or SDXL at 1024 px (lowmcgm alone)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    kohya = str(check_kohya_checkout(args.kohya)) if args.kohya else None  # fail before tracing
    if kohya and args.model != "sd15":
        ap.error("--kohya counts kohya's SD 1.x step: use --model sd15")
    started = time.perf_counter()

    rows = SD_ROWS if args.model == "sd15" else SDXL_ROWS
    cfgs = [resolve_config(preset, None, over) for _, preset, over, _ in rows]
    jobs = [build_job(cfg, "sdxl-base" if preset.startswith("sdxl") else "sd15", None)
            for cfg, (_, preset, _, _) in zip(cfgs, rows)]
    ours = mt.run_traced("lowmcgm.memory.flops:count_jobs", {"jobs": jobs}, 3600, mode="fake")["result"]
    runs = sorted({peer for *_, peer in rows if peer is not None})
    peers = {}
    if kohya:
        res = mt.run_traced("lowmcgm.memory.flops:count_kohya", {
            "kohya": kohya, "runs": [{"rank": r, "resolution": 512, "batch_size": b} for r, b in runs]},
            3600, mode="fake")["result"]
        peers = {(r["rank"], r["batch_size"]): r for r in res}
    sampling = {model: mt.run_traced("lowmcgm.memory.flops:count_sampling", {
        "model": model, "resolution": px, "modes": GUIDANCE_MODES}, 1800, mode="fake")["result"]
        for model, px in SAMPLING if (model == "sd15") == (args.model == "sd15")}
    wall = time.perf_counter() - started

    head = ("| configuration | settings | phase | total | forward | backward | recompute | attention capture "
            "| losses | ratio to kohya |")
    lines = ["Training step, GFLOP (1e9 matrix-class FLOPs; backward and recompute include the "
             "capture's share; losses: matrix FLOPs, then element operations).", "", head,
             "|---" * 10 + "|"]
    for rank, batch in runs:
        if (rank, batch) in peers:
            fig = peers[(rank, batch)]
            lines.append(f"| kohya train_network.py, rank {rank}, {batch} image{'s' * (batch > 1)}/step | LoRA r{rank} "
                         f"+TE ({fig['lora_modules']} modules), fp16, ckpt, SDPA, cached latents, batch {batch} | - | "
                         + " | ".join(step_cells(fig)) + " | - |")
    table_rows = []
    for (label, preset, over, peer), cfg, res in zip(rows, cfgs, ours):
        model = "SDXL 1024 px" if preset.startswith("sdxl") else "SD 1.5 512 px"
        for ph in res["phases"]:
            ratio = ""
            if peer in peers:
                ratio = f"{ph['total_flops'] / peers[peer]['total_flops']:.3f}"
            lines.append(f"| {label} ({model}) | {describe(cfg)} | {ph['phase']} | " + " | ".join(step_cells(ph))
                         + f" | {ratio} |")
            table_rows.append({"label": label, "preset": preset, "overrides": over, "settings": describe(cfg),
                               "model": model, "kohya_peer": peer, "ratio_to_kohya": float(ratio) if ratio else None,
                               **ph})

    steps = SampleSettings().steps
    guided = max(1, steps // 2)
    lines += ["", f"Sampling, GFLOP per denoising step (classifier-free guidance: the UNet on 2 rows) and per "
                  f"image at {steps} steps, {guided} guided, plus the VAE decode:", "",
              "| model | pose guidance | step (UNet) | of which backward + recompute | per image | extra per image "
              "| ratio to unguided |", "|---" * 7 + "|"]
    sampling_rows = []
    for model, figs in sampling.items():
        plain = next(f for f in figs if f["mode"] == "none")
        plain_image = steps * plain["step_flops"] + plain["decode_flops"]
        for fig in figs:
            guided_steps = guided if fig["mode"] != "none" else 0
            image = ((steps - guided_steps) * plain["step_flops"] + guided_steps * fig["step_flops"]
                     + fig["decode_flops"])
            grad = fig["windows"]["backward"] + fig["windows"]["recompute"]
            lines.append(f"| {model} | {fig['mode']} | {g(fig['step_flops'])} | {g(grad)} | {g(image)} | "
                         f"{g(image - plain_image)} | {image / plain_image:.2f} |")
            sampling_rows.append({"model": model, "mode": fig["mode"], "per_image_flops": image,
                                  "extra_per_image_flops": image - plain_image, **fig})
    lines += ["", "kohya flags: " + " ".join(KOHYA_DOC_FLAGS) + " --resolution=512, --network_dim and "
              "--train_batch_size as in each row" if kohya else "kohya: not counted (no --kohya PATH)",
              "", f"Counted in {wall:.0f} s."]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"training": table_rows, "kohya": list(peers.values()),
                                               "sampling": sampling_rows, "wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
