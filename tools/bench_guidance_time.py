"""Sampling time of latent pose guidance against unguided sampling, in one run on the same cores.

    OMP_NUM_THREADS=1 python tools/bench_guidance_time.py --run runs/bench_pose [--photo s2-p00] [--repeats 5]

Takes a photo of an earlier ``tools/bench_pose.py`` run (its trained MCGM artifact, its target
masks and prompts) and samples the targets, ``--repeats`` times, under three conditions taken in
turn within each repeat, so that other work on the machine weighs on each alike:

- ``none``: MCGM with the pose masks, unguided;
- ``latent``: the default latent guidance as lowmcgm runs it now (its pass cut after the last
  guided layer's block; checkpointed only where the model family says so);
- ``latent, as before``: the same guidance with the whole UNet pass under gradient checkpointing,
  as before the cut (``LatentGuidance(truncated=False)``, the family's choice overridden).

Prints the median seconds per image of each and their ratio to ``none``. The guided images of both
``latent`` conditions are compared: they must be equal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.artifact import load_artifact  # noqa: E402
from lowmcgm.config import SampleSettings  # noqa: E402
from lowmcgm.models.loading import load_base_model  # noqa: E402
from lowmcgm.sampling import latent_guidance  # noqa: E402
from lowmcgm.sampling.prompts import Pose, PromptSpec, no_mask_reason, plan_prompts  # noqa: E402
from lowmcgm.sampling.sampler import build_sampler, resolve_guidance  # noqa: E402
from lowmcgm.toy.scenes import handle_prompt  # noqa: E402

CONDITIONS = ("none", "latent", "latent, as before")


def load_mask(path: Path) -> np.ndarray:
    """A white-on-black mask PNG (as ``toy.scenes.save_mask`` writes them) as (H, W) bool."""
    return np.asarray(Image.open(path).convert("L")) > 127


@contextlib.contextmanager
def as_before(base) -> Iterator[None]:
    """Latent guidance as it ran before its pass was cut: the whole UNet, checkpointed."""
    family, init = base.family, latent_guidance.LatentGuidance.__init__
    family.guidance_checkpointing = True  # an instance attribute over the class's
    latent_guidance.LatentGuidance.__init__ = functools.partialmethod(init, truncated=False)
    try:
        yield
    finally:
        del family.guidance_checkpointing
        latent_guidance.LatentGuidance.__init__ = init


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the --out folder of a tools/bench_pose.py run")
    p.add_argument("--photo", default="s2-p00", help="its photo (a folder under photos/ with record.json)")
    p.add_argument("--training", default="mcgm")
    p.add_argument("--model", default="toy")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=2, help="seeds sampled together (as the benchmark)")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    folder = Path(args.run) / "photos" / args.photo
    record_file = folder / "record.json"
    if not record_file.is_file():
        raise SystemExit(f"{record_file} is missing: name a photo that run has finished (--photo)")
    record = json.loads(record_file.read_text())
    artifact = load_artifact(folder / args.training / "lowmcgm.safetensors")
    base = load_base_model(args.model)
    handles = artifact.handles
    size = int(load_mask(folder / "mask0.png").shape[0])
    plain = SampleSettings(num_images=args.images, seed=0, steps=args.sample_steps, guidance_scale=5.0,
                           scheduler="ddim", height=size, width=size, dtype="fp32")
    sampler = build_sampler(base, artifact, plain)
    targets = [t for t, target in enumerate(record["targets"]) if not target["own"]]
    seconds: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    images: dict[str, list[np.ndarray]] = {}
    for repeat in range(args.repeats):
        for condition in CONDITIONS:
            guidance = "none" if condition == "none" else "latent"
            settings = resolve_guidance(dataclasses.replace(plain, pose_guidance=guidance))
            started = time.perf_counter()
            got = []
            with as_before(base) if condition.endswith("as before") else contextlib.nullcontext():
                for t in targets:
                    masks = [load_mask(folder / f"target{t}-{j}.png") for j in range(len(handles))]
                    poses = {h: Pose(m, str(folder / f"target{t}-{j}.png"))
                             for j, (h, m) in enumerate(zip(handles, masks))}
                    spec = PromptSpec(handle_prompt(handles, record["targets"][t]["background"]), poses)
                    plan = plan_prompts([spec], {}, handles, no_mask_reason(settings, artifact),
                                        guided=guidance != "none")[0]
                    got += [np.asarray(im.convert("RGB")) for im in sampler.generate(plan, list(range(args.images)),
                                                                                    settings)]
            seconds[condition].append((time.perf_counter() - started) / (len(targets) * args.images))
            images[condition] = np.stack(got)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{c} {s[-1]:.3f} s" for c, s in seconds.items()),
              flush=True)
    same = bool(np.array_equal(images["latent"], images["latent, as before"]))
    median = {c: statistics.median(s) for c, s in seconds.items()}
    print(f"\n{args.photo} ({len(handles)} subjects), {len(targets)} targets x {args.images} images, "
          f"DDIM {args.sample_steps} steps, {args.threads} thread(s), median of {args.repeats}:")
    print("| condition | s per image | x unguided |\n|---|---|---|")
    for c in CONDITIONS:
        print(f"| {c} | {median[c]:.3f} | {median[c] / median['none']:.2f} |")
    print(f"guided images equal with and without the cut: {same}")
    return {"median_seconds": median, "seconds": seconds, "same_images": same}


if __name__ == "__main__":
    main()
