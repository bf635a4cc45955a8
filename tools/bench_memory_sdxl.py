"""Peak GPU memory of SDXL LoRA training at 1024 px: kohya-ss/sd-scripts' ``sdxl_train_network.py`` at its
documented low-VRAM settings (rank 32 and 8, each without and with ``--fp8_base``) beside lowmcgm's
``sdxl-8gb`` and ``sdxl-6gb`` presets, traced on the same fake-CUDA tracer (no GPU, no weights).

kohya's side is ``lowmcgm.memory.kohya_sdxl`` (what of kohya's code runs, what is re-created, and the
flags with their sources in kohya's docs); lowmcgm's is ``lowmcgm.memory.estimate``, as in
``tools/bench_memory.py``. The checkout at PATH is not a dependency and nothing of it is copied here.
Prints two markdown tables: every configuration's step peak per phase, setup peak, highest figure
and its ratio to kohya rank 32 with ``--fp8_base``; then the parts of the step peak (MiB) of the
presets' highest phases beside kohya rank 32's.

    OMP_NUM_THREADS=1 python tools/bench_memory_sdxl.py --kohya PATH [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lowmcgm.config import resolve_config
from lowmcgm.memory.estimate import GiB, build_job, config_words, run_jobs
from lowmcgm.memory.kohya_sdxl import (SDXL_DOC_FLAGS, SDXL_RESOLUTION, SDXL_VARIANTS, check_kohya_sdxl_checkout,
                                       trace_kohya_sdxl)
from lowmcgm.memory.peers import Figures, comparison_rows
from lowmcgm.memory.step_probe import PART_NAMES

MODEL = "sdxl-base"
PRESETS = ("sdxl-8gb", "sdxl-6gb")
PEER = (32, True)  # the ratio column's kohya variant: rank 32 with --fp8_base (lowmcgm's presets: fp8 UNet)
MiB = 2**20


def kohya_label(res: dict) -> str:
    return f"kohya sdxl_train_network.py, rank {res['rank']}" + (", --fp8_base" if res["fp8_base"] else "")


def kohya_settings(res: dict) -> str:
    return (f"LoRA r{res['rank']} UNet only ({res['lora_modules']} modules, {res['trainable_params'] / 1e6:.2f} M), "
            f"fp16{', fp8 UNet' if res['fp8_base'] else ''}, AdamW8bit, ckpt, SDPA, cached latents and TE outputs "
            "(TEs on the CPU), fp32 VAE, batch 1")


def preset_settings(cfg) -> str:
    return ", ".join(config_words(cfg, precision_note=" base",
                                  extras=("AdamW8bit" if cfg.train.optimizer == "adamw8bit" else "AdamW",)))


def itemised(presets: list[tuple[str, object]], kohya: list[dict]) -> list[list[str]]:
    """Header, then one row per part (MiB), the step peak and where it was reached: each preset's
    highest phase, then kohya's rank-32 variants."""
    columns = []
    for name, est in presets:
        ph = max(est.phases, key=lambda p: p.peak_bytes)
        columns.append((f"{name} (phase {ph.phase})", ph.parts, ph.peak_bytes, ph.peak_during))
    for res in sorted(kohya, key=lambda r: (r["rank"], r["fp8_base"]) != PEER):  # the peer first
        if res["rank"] == PEER[0]:
            columns.append((f"kohya r{res['rank']}" + (" fp8" if res["fp8_base"] else ""), res["parts"],
                            res["peak_bytes"], res["peak_during"]))
    rows = [["part"] + [head for head, *_ in columns]]
    rows += [[name] + [f"{parts[key] / MiB:.1f}" for _, parts, _, _ in columns] for key, name in PART_NAMES.items()]
    rows.append(["**step peak**"] + [f"**{peak / MiB:.1f}**" for _, _, peak, _ in columns])
    rows.append(["peak reached during"] + [during for *_, during in columns])
    return rows


def table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"] + ["| " + " | ".join(r) + " |"
                                                                               for r in rows[1:]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kohya", metavar="PATH", required=True, help="a kohya-ss/sd-scripts checkout")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    kohya = check_kohya_sdxl_checkout(args.kohya)  # fail before tracing
    cfgs = [resolve_config(preset, None, {}) for preset in PRESETS]
    jobs = [build_job(cfg, MODEL, SDXL_RESOLUTION) for cfg in cfgs]
    started = time.perf_counter()
    estimated = run_jobs(jobs, mode="fake", timeout_s=3600)
    kohya_results = trace_kohya_sdxl(kohya, SDXL_VARIANTS, timeout_s=3600)
    wall = time.perf_counter() - started

    figs = [Figures(kohya_label(r), kohya_settings(r), (r["peak_bytes"],), r["setup_peak_bytes"])
            for r in kohya_results]
    peer_res = next((r for r in kohya_results if (r["rank"], r["fp8_base"]) == PEER), kohya_results[0])
    peer = figs[kohya_results.index(peer_res)]
    ours = [f for f in figs if f is not peer]
    ours += [Figures(name, preset_settings(cfg), tuple(p.peak_bytes for p in est.phases),
                     max(p.setup_peak_bytes for p in est.phases)) for name, cfg, est in zip(PRESETS, cfgs, estimated)]
    commit = subprocess.run(["git", "-C", str(kohya), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown commit"
    lines = [f"SDXL base at {SDXL_RESOLUTION} px, kohya-ss/sd-scripts at {commit}; GiB = 2^30 bytes; 'highest' is the "
             "larger of the steps' peaks and the setup before them.", ""]
    head = ["configuration", "settings", "step peak (GiB, per phase)", "setup (GiB)", "highest (GiB)",
            f"ratio to {peer.label.removeprefix('kohya sdxl_train_network.py, ')}"]
    lines += table([head, *comparison_rows(ours, [peer])])
    rows = itemised(list(zip(PRESETS, estimated)), kohya_results)
    lines += ["", "Where the step peak goes (MiB; each preset's highest phase, kohya's rank-32 step):", ""]
    lines += table(rows)
    notes = sorted({n for r in kohya_results for n in r["notes"]})
    lines += ["", "kohya setup peaks (GiB): " + "; ".join(
                  f"r{r['rank']}{' fp8' if r['fp8_base'] else ''}: latent caching "
                  f"{r['latent_caching_peak_bytes'] / GiB:.2f}, text-encoder caching "
                  f"{r['text_encoder_caching_peak_bytes'] / GiB:.2f}" for r in kohya_results),
              "kohya flags: " + " ".join(SDXL_DOC_FLAGS) + f" --resolution={SDXL_RESOLUTION}, with "
              + ", ".join(f"--network_dim={r}" + (" --fp8_base" if f else "") for r, f in SDXL_VARIANTS),
              "kohya import shims: " + ("; ".join(notes) or "none"),
              "", f"Traced in {wall:.0f} s."]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": MODEL, "resolution": SDXL_RESOLUTION, "kohya_commit": commit, "kohya": kohya_results,
            "lowmcgm": {name: est.to_dict() for name, est in zip(PRESETS, estimated)}, "itemised": rows,
            "wall_s": round(wall, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
