"""What exposing the attention probabilities costs: the 8gb preset's training step with the capture
processors and attention losses, against the same step with plain SDPA everywhere and no attention
loss (``loss.use_attention_loss = false``), side by side in one run.

Runs the trainer's own ``train_step`` on the tiny model on the CPU (fp32: the trainer's CPU
fallback for the preset's fp16; torch AdamW for its 8-bit AdamW), interleaving the two setups step
by step so that background load hits both alike, and prints the median seconds per step of each
phase and their ratio.

    OMP_NUM_THREADS=1 python tools/bench_speed.py [--steps 40] [--preset 8gb] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dogcat"


def build(preset: str, attention_loss: bool, out: Path):
    from lowmcgm.config import resolve_config
    from lowmcgm.handles import default_handles
    from lowmcgm.models.tiny import build_tiny_base
    from lowmcgm.training.optimizer import choose_optimizer
    from lowmcgm.training.recipe import TrainingRecipe
    from lowmcgm.training.trainer import build_setup, training_device

    cfg = resolve_config(preset, None, {
        "model.base_model": "tiny", "data.image": str(EXAMPLE / "photo.png"),
        "data.masks": [str(EXAMPLE / "dog.png"), str(EXAMPLE / "cat.png")], "data.init_words": ["dog", "cat"],
        "output.out": str(out), "loss.use_attention_loss": attention_loss,
        # Prior preservation (if the preset has it) stays on, with few class images: generating the
        # default 100 would take minutes and changes nothing in a step.
        "train.num_class_images": 4})
    optimizer = choose_optimizer(cfg.train, training_device(), print)
    return TrainingRecipe(build_setup(cfg, build_tiny_base("tiny"), default_handles(2), lambda event: None, optimizer))


def time_phase(recipes: dict, phase: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Enter ``phase`` in each recipe, then time its steps, the recipes' steps interleaved."""
    for recipe in recipes.values():
        recipe.enter_phase(phase)
    times: dict[str, list[float]] = {name: [] for name in recipes}
    for i in range(warmup + steps):
        for name, recipe in recipes.items():  # interleaved: A, B, A, B, ...
            start = time.perf_counter()
            recipe.step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="8gb")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per phase and setup")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        recipes = {"capture": build(args.preset, True, Path(tmp) / "a"),
                   "plain SDPA": build(args.preset, False, Path(tmp) / "b")}
        rows = []
        for phase in (1, 2):
            times = time_phase(recipes, phase, args.steps, args.warmup)
            med = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"phase": phase, "capture_s": med["capture"], "plain_s": med["plain SDPA"],
                         "ratio": med["capture"] / med["plain SDPA"],
                         "capture_iqr_s": _iqr(times["capture"]), "plain_iqr_s": _iqr(times["plain SDPA"])})
    print(f"preset {args.preset}, tiny model, CPU fp32, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} steps after {args.warmup} warm-up, interleaved")
    print("| phase | with capture + attention losses (ms/step) | plain SDPA, no attention loss (ms/step) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {1e3 * r['capture_s']:.1f} (IQR {1e3 * r['capture_iqr_s']:.1f}) | "
              f"{1e3 * r['plain_s']:.1f} (IQR {1e3 * r['plain_iqr_s']:.1f}) | {r['ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "steps": args.steps, "rows": rows}, indent=2))
    return 0


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


if __name__ == "__main__":
    sys.exit(main())
