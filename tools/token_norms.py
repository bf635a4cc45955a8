"""Mask-token size against the handles' over training, from runs' ``loss_history.json``.

Each training step records ``mask_token_rms`` (RMS of the step's mask tokens) and ``handle_rms``
(RMS of the text-encoder states at the handles' positions: the context rows the mask tokens sit
beside). This prints both, and their ratio, at a few steps of each run, as a Markdown table for
docs/method.md:

    python tools/token_norms.py runs/paper runs/scaled [--at 1,50,100,200,300]

Steps count over both phases (phase 2's first step follows phase 1's last).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_norms(run: Path) -> list[tuple[int, float, float]]:
    """(step over both phases, mask_token_rms, handle_rms) of each recorded step of ``run``."""
    history = json.loads((run / "loss_history.json").read_text())
    return [(i + 1, h["mask_token_rms"], h["handle_rms"]) for i, h in enumerate(history) if "mask_token_rms" in h]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of lowmcgm train")
    parser.add_argument("--at", default="1,50,100,200,300", help="steps to show (comma-separated)")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.at.split(",")]
    print("| run | step | mask-token RMS | handle RMS | ratio |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        norms = {step: (mask, handle) for step, mask, handle in read_norms(run)}
        for step in steps:
            if step in norms:
                mask, handle = norms[step]
                print(f"| {run.name} | {step} | {mask:.3f} | {handle:.3f} | {mask / handle:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
