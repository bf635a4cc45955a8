"""Peak GPU memory of training SD 1.5 at 512 px: the reference setting, every preset, and ablations
of the 8gb preset, in one table, with the ratio of each to the reference.

Every figure is ``lowmcgm.memory.estimate``'s: the trainer's own setup and two training steps per phase,
traced on fake CUDA tensors on the full-size architecture (no GPU, no weights). With ``--measure`` on
a machine with a CUDA GPU and a CUDA build of torch, the same configurations also run for real with
random full-size weights and the measured ``max_memory_allocated`` / ``max_memory_reserved`` fill
the last columns, with the estimator's error.

Rows:
- reference code: the paper's setting as the reference code runs it by default (presets/reference.toml
  with its fp16 autocast: full UNet and text-encoder fine-tuning with fp32 master weights, AdamW,
  prior preservation, no checkpointing) with diffusers' explicit softmax ``AttnProcessor`` on every
  self-attention layer and every cross-attention layer keeping its full probabilities (the
  reference's P2P processor and AttentionStore). Every ratio is to its phase 2.
- the reference preset as lowmcgm runs it (fp32, SDPA, capture on the loss layers only).
- every shipped card preset, phase 1 and phase 2, as shipped.
- the 8gb preset without gradient checkpointing, with explicit softmax in self-attention, with
  full-softmax capture in every cross-attention layer, and with 32-bit AdamW.
- the 4gb, 6gb and 8gb presets without the attention losses and mask tokens
  (``loss.use_attention_loss = false``, ``loss.use_mask_tokens = false``).

With ``--kohya PATH`` (a kohya-ss/sd-scripts checkout; not a dependency, nothing of it is copied
here) a second table sets those presets, with and without the attention losses and mask tokens,
beside kohya's own ``train_network.py`` LoRA step at its documented low-VRAM settings, rank 8 and
the rank of its documentation's example (16), traced on the same tracer in the same run
(``lowmcgm.memory.peers``: what runs of kohya's code and what is re-created), and beside the
Break-a-scene reference code's setting as re-created above (its ``train.py`` itself cannot be
traced: docs/benchmarks.md says why). SD 1.5 only (kohya's U-Net is built with SD 1.5's config).

    OMP_NUM_THREADS=1 python tools/bench_memory.py [--model sd15] [--resolution 512] [--measure]
                                                   [--kohya PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lowmcgm.config import resolve_config
from lowmcgm.memory.estimate import GiB, build_job, config_words, margin_note, required_card_bytes, run_jobs
from lowmcgm.memory.peers import (KOHYA_DOC_FLAGS, KOHYA_DOC_RANK, Figures, check_kohya_checkout, comparison_rows,
                                  trace_kohya)

NO_MCGM_LOSSES = {"loss.use_attention_loss": False, "loss.use_mask_tokens": False}
# kohya ranks traced: the rank 8 (the 4gb preset's) and its documentation's example.
KOHYA_RANKS = (8, KOHYA_DOC_RANK)

# (label, preset, overrides, attention layout)
ROWS = [
    # The reference code's defaults (google/break-a-scene train.py: --mixed_precision fp16, trained
    # weights kept in fp32) with its explicit attention on every layer.
    ("reference code", "reference", {"model.mixed_precision": "fp16"}, "explicit"),
    # presets/reference.toml as lowmcgm runs it: fp32 compute, SDPA, capture on the loss layers only.
    ("reference preset, lowmcgm attention", "reference", {}, "sdpa"),
    ("4gb", "4gb", {}, "sdpa"),
    ("6gb", "6gb", {}, "sdpa"),
    ("8gb", "8gb", {}, "sdpa"),
    ("12gb", "12gb", {}, "sdpa"),
    ("8gb without gradient checkpointing", "8gb", {"model.use_gradient_checkpointing": False}, "sdpa"),
    ("8gb with explicit softmax in self-attention", "8gb", {}, "explicit-self"),
    ("8gb with full-softmax capture in every cross-attention", "8gb", {}, "full-capture"),
    ("8gb with 32-bit AdamW", "8gb", {"train.optimizer": "adamw"}, "sdpa"),
    ("4gb without attention losses and mask tokens", "4gb", NO_MCGM_LOSSES, "sdpa"),
    ("6gb without attention losses and mask tokens", "6gb", NO_MCGM_LOSSES, "sdpa"),
    ("8gb without attention losses and mask tokens", "8gb", NO_MCGM_LOSSES, "sdpa"),
]
# The side-by-side table's lowmcgm rows (labels of ROWS) and its re-created peer.
SIDE_BY_SIDE = ("4gb", "4gb without attention losses and mask tokens", "6gb",
                "6gb without attention losses and mask tokens", "8gb", "8gb without attention losses and mask tokens")
REFERENCE_LABEL = "reference code"


def describe(cfg) -> str:
    """The settings that decide memory, in a few words."""
    lo, t = cfg.lora, cfg.train
    what = config_words(cfg, precision_note=" base", extras=("AdamW8bit" if t.optimizer == "adamw8bit" else "AdamW",))
    if t.phase2_handle_lr == 0 and not lo.use_text_encoder_lora and lo.phase2_mode == "lora":
        what.append("TE off GPU in ph.2")
    return ", ".join(what)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--measure", action="store_true", help="also run for real on a CUDA GPU")
    ap.add_argument("--kohya", metavar="PATH", help="a kohya-ss/sd-scripts checkout: add the side-by-side table")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    kohya = check_kohya_checkout(args.kohya) if args.kohya else None  # fail before tracing
    if kohya and args.model != "sd15":
        ap.error("--kohya traces kohya's U-Net with SD 1.5's config: use --model sd15")
    cfgs = [resolve_config(preset, None, over) for _, preset, over, _ in ROWS]
    jobs = [build_job(cfg, args.model, args.resolution, attention) for cfg, (_, _, _, attention) in zip(cfgs, ROWS)]
    started = time.perf_counter()
    estimated = run_jobs(jobs, mode="fake", timeout_s=3600)
    measured = run_jobs(jobs, mode="cuda", timeout_s=3600) if args.measure else [None] * len(jobs)
    kohya_results = trace_kohya(kohya, list(KOHYA_RANKS), args.resolution) if kohya else []
    wall = time.perf_counter() - started

    reference = estimated[0].phase(2).peak_bytes
    lines = [f"{args.model} at {args.resolution} px; GiB = 2^30 bytes; 'card' = peak with the margin "
             f"({margin_note()}).",
             "",
             "| configuration | settings | phase | estimated peak (GiB) | card needed (GiB) | ratio to reference "
             "| measured allocated (GiB) | measured reserved (GiB) | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for (label, preset, over, attention), cfg, est, real in zip(ROWS, cfgs, estimated, measured):
        for ph in est.phases:
            real_ph = real.phase(ph.phase) if real is not None else None
            row = {"label": label, "preset": preset, "overrides": over, "attention": attention,
                   "phase": ph.phase, "peak_bytes": ph.peak_bytes, "setup_peak_bytes": ph.setup_peak_bytes,
                   "parts": ph.parts, "peak_during": ph.peak_during,
                   "card_bytes": required_card_bytes(max(ph.peak_bytes, ph.setup_peak_bytes)),
                   "ratio": ph.peak_bytes / reference,
                   "measured_bytes": real_ph.peak_bytes if real_ph else None}
            rows.append(row)
            meas = f"{real_ph.peak_bytes / GiB:.2f}" if real_ph else ""
            reserved = f"{real_ph.peak_reserved_bytes / GiB:.2f}" if real_ph and real_ph.peak_reserved_bytes else ""
            err = f"{ph.peak_bytes / real_ph.peak_bytes - 1:+.1%}" if real_ph else ""
            lines.append(f"| {label} | {describe(cfg)} | {ph.phase} | {ph.peak_bytes / GiB:.2f} | "
                         f"{row['card_bytes'] / GiB:.2f} | {ph.peak_bytes / reference:.3f} | {meas} | {reserved} | {err} |")
    if not args.measure:
        lines += ["", "Measured columns empty: no CUDA GPU was available for this run (rerun with --measure "
                      "on one)."]
    side = side_by_side(cfgs, estimated, kohya_results) if kohya else []
    if kohya:
        lines += ["", f"Side by side with kohya-ss/sd-scripts ({kohya}), {args.model} at {args.resolution} px, "
                      "GiB; the ratios are of each row's highest figure to each peer's:", ""]
        peers = ["kohya r" + str(r) for r in KOHYA_RANKS] + ["Break-a-scene (re-created)"]
        lines += ["| configuration | settings | step peak (GiB, per phase) | setup (GiB) | highest (GiB) | "
                  + " | ".join(f"ratio to {p}" for p in peers) + " |", "|---" * (5 + len(peers)) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in side]
        notes = sorted({n for res in kohya_results for n in res["notes"]})
        lines += ["", "kohya flags: " + " ".join(KOHYA_DOC_FLAGS) + f" --resolution={args.resolution} --network_dim="
                  + " or ".join(map(str, KOHYA_RANKS)),
                  "kohya import shims: " + ("; ".join(notes) or "none")]
    lines += ["", f"Traced in {wall:.0f} s."]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "resolution": args.resolution, "rows": rows,
                                               "kohya": kohya_results, "side_by_side": side}, indent=2))
    return 0


def side_by_side(cfgs: list, estimated: list, kohya_results: list[dict]) -> list[list[str]]:
    """The side-by-side table's cells: kohya per rank and the re-created reference as peers, then
    :data:`SIDE_BY_SIDE`'s lowmcgm rows."""
    by_label = {label: (cfg, est) for (label, *_), cfg, est in zip(ROWS, cfgs, estimated)}

    def ours(label: str) -> Figures:
        cfg, est = by_label[label]
        return Figures(label, describe(cfg), tuple(p.peak_bytes for p in est.phases),
                       max(p.setup_peak_bytes for p in est.phases))

    peers = [Figures(f"kohya train_network.py, rank {rank}",
                     f"LoRA r{rank} UNet+TE ({res['lora_modules']} modules, {res['trainable_params'] / 1e6:.2f} M), "
                     "fp16 base, AdamW8bit, ckpt, SDPA, cached latents, batch 1",
                     (res["peak_bytes"],), res["setup_peak_bytes"])
             for rank, res in zip(KOHYA_RANKS, kohya_results)]
    reference = ours(REFERENCE_LABEL)
    peers.append(Figures("Break-a-scene reference code (re-created, not its train.py)", reference.settings,
                         reference.step_peaks, reference.setup_peak))
    return comparison_rows([ours(label) for label in SIDE_BY_SIDE], peers)


if __name__ == "__main__":
    sys.exit(main())
