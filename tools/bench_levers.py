"""What the SDXL memory levers cost in time (issue 27): phase 1's training step under each setting,
on the tiny SDXL model on the CPU, the settings' steps interleaved in one run, as ratios to the first.

Phase 1 only: it is where the levers act (the handles train through the text encoders). In phase 2
with frozen handles (both rows' ``train.phase2_handle_lr = 0``) the prompts are encoded once and the
text encoders wait on the CPU, so checkpointing or fp8 storage of them changes nothing there. The
memory each lever saves is ``lowmcgm estimate``'s (docs/benchmarks.md, "SDXL on a 6 GB card").

A CPU ratio says what the extra work is (a second text-encoder forward per step, an fp8 upcast per
layer), not what a GPU pays for it: on the tiny model the text encoders are a larger share of the
step than SDXL's are at 1024 px.

    OMP_NUM_THREADS=1 python tools/bench_levers.py [--steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_speed import time_phase  # tools/ is on the path when a tool runs as a script

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dogcat"

# (label, preset, overrides): the first row is the one the others are divided by.
SETTINGS = [
    ("sdxl-8gb, phase 2 handles frozen", "sdxl-8gb", {"train.phase2_handle_lr": 0.0}),
    ("+ text encoders checkpointed", "sdxl-8gb",
     {"train.phase2_handle_lr": 0.0, "model.text_encoder_checkpointing": True}),
    ("+ text encoders in fp8 (sdxl-6gb)", "sdxl-6gb", {}),
]


def build(preset: str, overrides: dict, out: Path):
    from lowmcgm.config import resolve_config
    from lowmcgm.handles import default_handles
    from lowmcgm.models.tiny import build_tiny_base
    from lowmcgm.training.optimizer import choose_optimizer
    from lowmcgm.training.recipe import TrainingRecipe
    from lowmcgm.training.trainer import build_setup, training_device

    cfg = resolve_config(preset, None, {
        "model.base_model": "tiny-xl", "data.image": str(EXAMPLE / "photo.png"),
        "data.masks": [str(EXAMPLE / "dog.png"), str(EXAMPLE / "cat.png")], "data.init_words": ["dog", "cat"],
        "output.out": str(out)} | overrides)
    optimizer = choose_optimizer(cfg.train, training_device(), print)
    return TrainingRecipe(build_setup(cfg, build_tiny_base("tiny-xl"), default_handles(2), lambda event: None,
                                      optimizer))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed phase-1 steps per setting")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        recipes = {label: build(preset, overrides, Path(tmp) / str(i))
                   for i, (label, preset, overrides) in enumerate(SETTINGS)}
        times = time_phase(recipes, 1, args.steps, args.warmup)  # interleaved: background load hits all alike
    medians = [statistics.median(times[label]) for label, _, _ in SETTINGS]
    print(f"tiny-xl, phase 1, CPU fp32, {torch.get_num_threads()} thread(s), median of {args.steps} steps "
          f"after {args.warmup} warm-up, interleaved")
    print("| setting | ms/step | ratio |")
    print("|---|---|---|")
    for (label, _, _), median in zip(SETTINGS, medians):
        print(f"| {label} | {1e3 * median:.1f} | {median / medians[0]:.2f} |")
    if args.json:
        rows = [{"setting": label, "median_s": m, "ratio": m / medians[0]}
                for (label, _, _), m in zip(SETTINGS, medians)]
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
