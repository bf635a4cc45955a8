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
from lowmcgm.memory.peers import (KOHYA_DOC_FLAGS, KOHYA_DOC_RANK, Figures, check_kohya_checkout, trace_kohya)
from lowmcgm.memory.saved_activations import trace_saved
from lowmcgm.memory.step_probe import PART_NAMES

NO_MCGM_LOSSES = {"loss.use_attention_loss": False, "loss.use_mask_tokens": False}
# kohya traced at (rank, images per step): each SD preset's equal settings (a preset with prior
# preservation puts the photo and a class image in one UNet pass, as kohya's regularisation images
# in its batch) and its documentation's example (rank 16, batch 1).
KOHYA_PEERS = ((8, 1), (KOHYA_DOC_RANK, 1), (16, 2), (32, 4))
EQUAL_SETTINGS = {"4gb": (8, 1), "6gb": (16, 2), "8gb": (32, 4)}  # preset -> its kohya peer
ITEMISED = ("4gb", (8, 1))  # the pair whose kept activations are itemised by module

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
    kohya_results = trace_kohya(kohya, list(KOHYA_PEERS), args.resolution, saved=ITEMISED[1]) if kohya else []
    ours_saved = trace_saved(build_job(resolve_config(ITEMISED[0], None, {}), args.model, args.resolution),
                             phase=2) if kohya else {}
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
    itemised = itemised_rows(cfgs, estimated, kohya_results, ours_saved) if kohya else []
    if kohya:
        lines += ["", f"Side by side with kohya-ss/sd-scripts ({kohya}), {args.model} at {args.resolution} px, "
                      "GiB; each ratio is of a row's highest figure to the peer's:", ""]
        lines += ["| configuration | settings | step peak (GiB, per phase) | setup (GiB) | highest (GiB) | "
                  "kohya at equal settings (GiB) | ratio to it | ratio to kohya r8 | ratio to Break-a-scene "
                  "(re-created) |", "|---" * 9 + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in side]
        lines += ["", f"Where each preset's step peak goes beside kohya's at equal settings (MiB; the phase of "
                      f"the preset's highest step; 'kept activations by model': what autograd saved for backward "
                      f"in {ITEMISED[0]}'s phase-2 step and kohya r{ITEMISED[1][0]}'s, weights left out):", ""]
        lines += ["| part | " + " | ".join(head for head in itemised[0]) + " |", "|---" * (1 + len(itemised[0])) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in itemised[1:]]
        notes = sorted({n for res in kohya_results for n in res["notes"]})
        lines += ["", "kohya flags: " + " ".join(KOHYA_DOC_FLAGS) + f" --resolution={args.resolution}, with "
                  + ", ".join(f"--network_dim={r} --train_batch_size={b}" for r, b in KOHYA_PEERS),
                  "kohya import shims: " + ("; ".join(notes) or "none")]
    lines += ["", f"Traced in {wall:.0f} s."]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "resolution": args.resolution, "rows": rows,
                                               "kohya": kohya_results, "side_by_side": side,
                                               "itemised": itemised, "saved_by_module": ours_saved}, indent=2))
    return 0


def _kohya_label(rank: int, batch: int) -> str:
    return f"kohya r{rank}, batch {batch}"


def side_by_side(cfgs: list, estimated: list, kohya_results: list[dict]) -> list[list[str]]:
    """The side-by-side table's cells: kohya at each traced setting and the re-created reference,
    then :data:`SIDE_BY_SIDE`'s lowmcgm rows, each with its kohya peer at equal settings."""
    by_label = {label: (cfg, est) for (label, *_), cfg, est in zip(ROWS, cfgs, estimated)}

    def ours(label: str) -> Figures:
        cfg, est = by_label[label]
        return Figures(label, describe(cfg), tuple(p.peak_bytes for p in est.phases),
                       max(p.setup_peak_bytes for p in est.phases))

    kohya = {(rank, batch): Figures(
        f"kohya train_network.py, rank {rank}, batch {batch}",
        f"LoRA r{rank} UNet+TE ({res['lora_modules']} modules, {res['trainable_params'] / 1e6:.2f} M), fp16 base, "
        f"AdamW8bit, ckpt (UNet and TE), SDPA, cached latents, batch {batch}", (res["peak_bytes"],),
        res["setup_peak_bytes"]) for (rank, batch), res in zip(KOHYA_PEERS, kohya_results)}
    reference = ours(REFERENCE_LABEL)
    reference = Figures("Break-a-scene reference code (re-created, not its train.py)", reference.settings,
                        reference.step_peaks, reference.setup_peak)
    r8 = kohya[(8, 1)]
    rows = []
    for fig, peer in [*((k, None) for k in kohya.values()), (reference, None),
                      *((ours(label), kohya[EQUAL_SETTINGS[label.split()[0]]]) for label in SIDE_BY_SIDE)]:
        cells = [fig.label, fig.settings, " / ".join(f"{p / GiB:.2f}" for p in fig.step_peaks),
                 f"{fig.setup_peak / GiB:.2f}", f"{fig.highest / GiB:.2f}"]
        cells += [f"{peer.highest / GiB:.2f} ({_kohya_label(*EQUAL_SETTINGS[fig.label.split()[0]])})",
                  f"**{fig.highest / peer.highest:.3f}**"] if peer else ["-", "-"]
        cells += ["-" if fig is r8 else f"{fig.highest / r8.highest:.2f}",
                  "-" if fig is reference else f"{fig.highest / reference.highest:.2f}"]
        rows.append(cells)
    return rows




def itemised_rows(cfgs: list, estimated: list, kohya_results: list[dict], ours_saved: dict) -> list[list[str]]:
    """Header, then one row per part of the step peak (MiB): each preset of :data:`EQUAL_SETTINGS` and
    its kohya peer side by side, then the kept activations of :data:`ITEMISED` by model."""
    by_label = {label: est for (label, *_), est in zip(ROWS, estimated)}
    kohya = dict(zip(KOHYA_PEERS, kohya_results))
    columns = []
    for preset, peer in EQUAL_SETTINGS.items():
        phase = max(by_label[preset].phases, key=lambda p: p.peak_bytes)
        columns += [(f"{preset} (phase {phase.phase})", phase.parts, phase.peak_bytes, phase.peak_during),
                    (_kohya_label(*peer), kohya[peer]["parts"], kohya[peer]["peak_bytes"], kohya[peer]["peak_during"])]
    mib = 2 ** 20
    rows = [[head for head, *_ in columns]]
    for key, name in PART_NAMES.items():
        rows.append([name] + [f"{parts[key] / mib:.1f}" for _, parts, _, _ in columns])
    rows.append(["**step peak**"] + [f"**{peak / mib:.1f}**" for _, _, peak, _ in columns])
    rows.append(["peak reached during"] + [during for *_, during in columns])
    ours = _by_model(ours_saved.get("by_module", {}))
    theirs = _by_model(kohya[ITEMISED[1]].get("saved_by_module", {}))
    for model in sorted(set(ours) | set(theirs), key=lambda m: -(ours.get(m, 0) + theirs.get(m, 0))):
        cells = ["" for _ in columns]
        cells[0], cells[1] = f"{ours.get(model, 0) / mib:.1f}", f"{theirs.get(model, 0) / mib:.1f}"
        rows.append([f"kept activations by model: {model}"] + cells)
    return rows


def _by_model(by_module: dict[str, int]) -> dict[str, int]:
    """Saved bytes by model and its top-level block (``unet.up_blocks``, ``text_encoder``)."""
    out: dict[str, int] = {}
    for name, n in by_module.items():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "unet" else parts[0]
        out[key] = out.get(key, 0) + n
    return out


if __name__ == "__main__":
    sys.exit(main())
