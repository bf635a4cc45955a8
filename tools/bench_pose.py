"""Pose benchmark: MCGM against Break-a-scene on held-out toy photos, measured instead of a user study.

    python tools/bench_pose.py [--photos 2] [--steps 400] [--model toy] [--out runs/bench_pose]

For 1, 2 and 3 subjects (``--subjects``), ``--photos`` photos each:

- Photo: a toy scene of distinct kinds in which at least one subject forms a held-out
  (kind, pose, background) combination (``HELDOUT_COMBOS``: absent from the toy base model's
  training captions), cycling through the combinations (1 subject from the first, 2 from the
  third, 3 from the fifth).
- Targets (``--targets`` per photo): every subject gets a new pose, drawn as a mask where it
  stands (same place, size and facing, new pose and joint jitter); the prompt names a background
  other than the photo's, so that following it is not copying the photo.
- Training, same seed, steps and preset (``toy-cpu``): (a) MCGM, mask tokens and mask-attention
  loss; (b) Break-a-scene, ``loss.use_mask_tokens=false``.
- Sampling, ``--images`` seeds per target, the same seeds everywhere: MCGM with the pose masks,
  MCGM with blank masks, Break-a-scene.

Measured on every image with the toy world's segmentation (``lowmcgm.toy.metrics``):

- pose adherence: IoU of each subject's silhouette (``kind_mask`` on ``foreground_mask``) with its
  target mask; a subject that is not drawn (no blob of its colours holding most of them, or an
  image that is mostly "foreground", i.e. noise) scores 0. For reference, ``copy`` is the IoU a model
  would get by redrawing the photo's pose unchanged.
- identity: RGB distance between the mean colours of the generated and the source subject (drawn
  subjects only; lower is better).
- prompt following: the background class is the prompt's.

Writes ``results.md`` (tables and the command), ``results.json`` (every image's figures),
``figure.png`` (source, target masks, outputs side by side) and every image under ``photos/``.
Each photo's figures are kept in ``photos/<id>/record.json``: a rerun with the same settings and
``--out`` reuses them, so a long run that was stopped continues where it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.toy import metrics  # noqa: E402
from lowmcgm.toy.scenes import (  # noqa: E402
    BACKDROPS,
    BACKGROUNDS,
    HELDOUT_COMBOS,
    PALETTES,
    POSES,
    Scene,
    render_pose_mask,
    render_scene,
    sample_offsets,
    sample_scene,
    scene_combos,
)

BENCH_SEED = 9_100_003  # photo streams: [BENCH_SEED, --seed, subjects]; no training stream uses it
CONDITIONS = ("mcgm_pose", "mcgm_blank", "break_a_scene")
SHORT_LABELS = {"mcgm_pose": "MCGM pose", "mcgm_blank": "MCGM blank", "break_a_scene": "BaS"}
# A subject hidden behind others for more than this share of its silhouette is redrawn elsewhere:
# its mask would teach too few pixels and its IoU would measure occlusion.
MAX_HIDDEN_FRACTION = 0.3
MAX_SCENE_TRIES = 20_000
# Rendered scenes keep at most about a quarter of the image in front of the background; an image
# whose "foreground" covers most of it is noise or a colour wash, and nothing in it counts as drawn.
MAX_FOREGROUND_FRACTION = 0.5


@dataclass
class Target:
    """New poses for every subject of a photo, and the prompt's background."""

    poses: list[str]
    masks: list[np.ndarray]  # (S, S) bool per subject
    background: str


@dataclass
class BenchPhoto:
    """A held-out photo: the scene, its render, its masks and its targets."""

    key: str  # e.g. "s2-p01"
    scene: Scene
    image: np.ndarray  # (S, S, 3) uint8
    masks: list[np.ndarray]  # (S, S) bool per subject
    targets: list[Target]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.scene.subjects]


def _heldout_scene(rng: np.random.Generator, n_subjects: int, combo: tuple[str, str, str],
                   size_px: int) -> tuple[Scene, np.ndarray, list[np.ndarray]]:
    """A scene of distinct kinds that shows ``combo``, every subject mostly visible (rejection sampling)."""
    for _ in range(MAX_SCENE_TRIES):
        scene = sample_scene(rng, n_subjects=n_subjects, backgrounds=[combo[2]])
        kinds = [s.kind for s in scene.subjects]
        if len(set(kinds)) < n_subjects or combo not in scene_combos(scene):
            continue
        image, masks = render_scene(scene, size_px)
        whole = [render_pose_mask(s.kind, s.pose, size_px, s.x, s.y, s.scale, s.flip, s.offsets)
                 for s in scene.subjects]
        if all(m.sum() >= (1 - MAX_HIDDEN_FRACTION) * w.sum() > 0 for m, w in zip(masks, whole)):
            return scene, image, masks
    raise RuntimeError(f"no scene with {n_subjects} distinct subjects shows {combo} after {MAX_SCENE_TRIES} tries")


def make_photos(n_subjects: int, count: int, targets: int, size_px: int, seed: int) -> list[BenchPhoto]:
    """``count`` held-out photos of ``n_subjects`` subjects, ``targets`` targets each (deterministic)."""
    rng = np.random.default_rng([BENCH_SEED, seed, n_subjects])
    photos = []
    for i in range(count):
        # Each number of subjects starts at another combination, so a short run sees several backgrounds.
        combo = HELDOUT_COMBOS[(i + 2 * (n_subjects - 1)) % len(HELDOUT_COMBOS)]
        scene, image, masks = _heldout_scene(rng, n_subjects, combo, size_px)
        photo_targets = []
        for _ in range(targets):
            poses, target_masks = [], []
            for s in scene.subjects:
                pose = str(rng.choice([p for p in POSES if p != s.pose]))
                offsets = sample_offsets(rng, s.kind, pose)
                poses.append(pose)
                target_masks.append(render_pose_mask(s.kind, pose, size_px, s.x, s.y, s.scale, s.flip, offsets))
            background = str(rng.choice([b for b in BACKGROUNDS if b != scene.background]))
            photo_targets.append(Target(poses, target_masks, background))
        photos.append(BenchPhoto(f"s{n_subjects}-p{i:02d}", scene, image, masks, photo_targets))
    return photos


def prompt_text(handles: list[str], background: str) -> str:
    """``a photo of <asset0> and <asset1> in the snow``: the toy captions' wording."""
    return f"a photo of {' and '.join(handles)} {BACKDROPS[background].preposition} the {background}"


def measure(image: np.ndarray, photo: BenchPhoto, target: Target) -> dict:
    """Pose adherence, identity and prompt following of one generated image.

    Args:
        image: (S, S, 3) uint8, the size of the photo.
    """
    background = metrics.classify_background(image)
    fg = metrics.foreground_mask(image, background)
    ious, drawn, colour = [], [], []
    for kind, source, goal in zip(photo.kinds, photo.masks, target.masks):
        silhouette = metrics.kind_mask(image, fg, kind)
        blob = metrics.largest_component(silhouette)
        # Drawn: one blob holding most of the kind's pixels, not specks of its colours in noise.
        present = (fg.mean() <= MAX_FOREGROUND_FRACTION and metrics.subject_present(blob)
                   and blob.sum() >= 0.5 * silhouette.sum())
        drawn.append(bool(present))
        ious.append(metrics.iou(silhouette, goal) if present else 0.0)
        if present:
            generated = image[silhouette].astype(np.float32).mean(0)
            colour.append(float(np.linalg.norm(generated - photo.image[source].astype(np.float32).mean(0))))
        else:
            colour.append(None)
    return {"background": background, "background_ok": background == target.background, "iou": ious,
            "drawn": drawn, "colour_distance": colour, "main_kind": metrics.classify_kind(image, fg)}


# ----------------------------------------------------------------------------------------------
# Training and sampling: lowmcgm's own trainer and sampler, as `lowmcgm run` uses them.

def _save_mask(mask: np.ndarray, path: Path) -> str:
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
    return str(path)


def train_and_sample(photo: BenchPhoto, method: str, folder: Path, args: argparse.Namespace,
                     files: dict) -> dict[str, list[list[np.ndarray]]]:
    """Train ``method`` ("mcgm" or "break_a_scene") on the photo; sample every target.

    Returns:
        condition -> per target, the images (one per seed), (S, S, 3) uint8.
    """
    from lowmcgm.artifact import load_artifact
    from lowmcgm.config import resolve_config
    from lowmcgm.models import load_base_model
    from lowmcgm.sampler import PromptSpec, SampleSettings, build_sampler, no_mask_reason, plan_prompts
    from lowmcgm.trainer import train

    overrides = {
        "model.base_model": args.model, "data.image": files["photo"], "data.masks": files["masks"],
        "data.init_words": photo.kinds, "output.out": str(folder / method), "train.seed": args.seed,
        "train.checkpoint_every": 0, "loss.use_mask_tokens": method == "mcgm",
    }
    if args.steps is not None:
        overrides |= {"train.phase1_steps": args.steps, "train.phase2_steps": args.steps}
    cfg = resolve_config(args.preset, None, overrides)
    base = load_base_model(args.model)  # fresh: train() adds handles and adapters to it
    artifact_path = train(cfg, base=base)
    artifact = load_artifact(artifact_path)
    size = int(photo.image.shape[0])
    settings = SampleSettings(num_images=args.images, seed=0, steps=args.sample_steps,
                              guidance_scale=args.guidance, scheduler="ddim", height=size, width=size,
                              dtype="fp32")
    sampler = build_sampler(base, artifact, settings)  # the base train() used, as `lowmcgm run` does
    handles = artifact.handles
    conditions = ("mcgm_pose", "mcgm_blank") if method == "mcgm" else ("break_a_scene",)
    out: dict[str, list[list[np.ndarray]]] = {c: [] for c in conditions}
    for t, target in enumerate(photo.targets):
        text = prompt_text(handles, target.background)
        for condition in conditions:
            poses = dict(zip(handles, files["targets"][t])) if condition == "mcgm_pose" else {}
            plan = plan_prompts([PromptSpec(text, poses, where=f"target {t}")], {}, handles,
                                no_mask_reason(settings, artifact))[0]
            images = sampler.generate(plan, list(range(args.images)), settings)
            out[condition].append([np.asarray(im.convert("RGB")) for im in images])
    return out


def run_photo(photo: BenchPhoto, folder: Path, args: argparse.Namespace, settings_key: dict) -> dict:
    """Train both methods on one photo, sample and measure; reuse ``record.json`` when it matches."""
    record_path = folder / "record.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings_key:
            return record
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo.image).save(folder / "photo.png")
    files = {"photo": str(folder / "photo.png"),
             "masks": [_save_mask(m, folder / f"mask{j}.png") for j, m in enumerate(photo.masks)],
             "targets": [[_save_mask(m, folder / f"target{t}-{j}.png") for j, m in enumerate(target.masks)]
                         for t, target in enumerate(photo.targets)]}
    images = {}
    for method in ("mcgm", "break_a_scene"):
        started = time.perf_counter()
        images |= train_and_sample(photo, method, folder, args, files)
        print(f"  {photo.key} {method}: {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for condition, per_target in images.items():
        for t, target in enumerate(photo.targets):
            for seed, image in enumerate(per_target[t]):
                name = f"{condition}-t{t}-seed{seed}.png"
                Image.fromarray(image).save(folder / name)
                rows.append({"condition": condition, "target": t, "seed": seed, "file": name,
                             **measure(image, photo, target)})
    record = {
        "settings": settings_key, "key": photo.key, "subjects": len(photo.kinds), "kinds": photo.kinds,
        "source_poses": [s.pose for s in photo.scene.subjects], "background": photo.scene.background,
        "scene": dataclasses.asdict(photo.scene),
        "targets": [{"poses": t.poses, "background": t.background,
                     "copy_iou": [metrics.iou(m, g) for m, g in zip(photo.masks, t.masks)]}
                    for t in photo.targets],
        "images": rows,
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------------------------
# Summary, tables and figure.

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(records: list[dict]) -> dict:
    """Per number of subjects (and ``all``): the table's figures."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record["subjects"]), []).append(record)
    groups["all"] = records
    summary = {}
    for name, recs in groups.items():
        by_pair: dict[tuple, dict[str, dict]] = {}
        copy = []
        for rec in recs:
            for row in rec["images"]:
                by_pair.setdefault((rec["key"], row["target"], row["seed"]), {})[row["condition"]] = row
            for t in rec["targets"]:
                copy.append(float(np.mean(t["copy_iou"])))
        pairs = [p for p in by_pair.values() if set(p) == set(CONDITIONS)]
        iou = {c: [float(np.mean(p[c]["iou"])) for p in pairs] for c in CONDITIONS}
        entry = {"photos": len(recs), "pairs": len(pairs), "copy_iou": _mean(copy)}
        for c in CONDITIONS:
            rows = [p[c] for p in pairs]
            entry[c] = {
                "iou": _mean(iou[c]),
                "drawn": _mean([float(d) for r in rows for d in r["drawn"]]),
                "colour_distance": _mean([d for r in rows for d in r["colour_distance"]]),
                "background_ok": _mean([float(r["background_ok"]) for r in rows]),
            }
        pose, bas = np.array(iou["mcgm_pose"]), np.array(iou["break_a_scene"])
        entry["mcgm_beats_bas"] = float(np.mean(pose > bas)) if pairs else None
        entry["ties"] = float(np.mean(pose == bas)) if pairs else None
        summary[name] = entry
    return summary


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if percent else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def markdown_tables(summary: dict) -> str:
    names = [n for n in ("1", "2", "3") if n in summary] + ["all"]
    lines = ["| subjects | photos | pairs | IoU MCGM, pose mask | IoU MCGM, blank mask | IoU Break-a-scene "
             "| IoU if the source pose is copied | MCGM beats Break-a-scene (ties) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in names:
        e = summary[n]
        lines.append(f"| {n} | {e['photos']} | {e['pairs']} | {_fmt(e['mcgm_pose']['iou'])} | "
                     f"{_fmt(e['mcgm_blank']['iou'])} | {_fmt(e['break_a_scene']['iou'])} | "
                     f"{_fmt(e['copy_iou'])} | {_fmt(e['mcgm_beats_bas'], True)} ({_fmt(e['ties'], True)}) |")
    lines += ["", "| subjects | subjects drawn: MCGM pose / blank / BaS | colour distance to the source "
              "(RGB, lower is better): MCGM pose / blank / BaS | background as prompted: MCGM pose / blank / BaS |",
              "|---|---|---|---|"]
    for n in names:
        e = summary[n]
        cells = [" / ".join(_fmt(e[c][key], pct) for c in CONDITIONS)
                 for key, pct in (("drawn", True), ("colour_distance", False), ("background_ok", True))]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _composite(photo_kinds: list[str], masks: list[np.ndarray]) -> Image.Image:
    """Target masks on black, each in its kind's main colour (so two subjects read apart)."""
    out = np.zeros(masks[0].shape + (3,), np.uint8)
    for kind, mask in zip(photo_kinds, masks):
        out[mask] = PALETTES[kind][0]
    return Image.fromarray(out)


def render_figure(records: list[dict], out_dir: Path, max_rows: int) -> Image.Image:
    """Rows of source photo, target masks, then seed 0 of each condition."""
    from lowmcgm.previews import SheetRow, render_contact_sheet

    rows = []
    for rec in records:
        folder = out_dir / "photos" / rec["key"]
        for t, target in enumerate(rec["targets"]):
            if len(rows) >= max_rows:
                break
            masks = [np.asarray(Image.open(folder / f"target{t}-{j}.png")) > 127 for j in range(rec["subjects"])]
            by_condition = {r["condition"]: r for r in rec["images"] if r["target"] == t and r["seed"] == 0}
            subjects = ", ".join(f"{k} {a}->{b}" for k, a, b in zip(rec["kinds"], rec["source_poses"], target["poses"]))
            row = SheetRow(title=f"{rec['key']}: {subjects}; {rec['background']} -> {target['background']}",
                           poses=[("source", Image.open(folder / "photo.png")),
                                  ("target masks", _composite(rec["kinds"], masks))])
            for c in CONDITIONS:
                r = by_condition[c]
                row.images.append((f"{SHORT_LABELS[c]} {np.mean(r['iou']):.2f}", Image.open(folder / r["file"])))
            rows.append(row)
    return render_contact_sheet(rows)


def write_report(out_dir: Path, summary: dict, command: str, args: argparse.Namespace, model_note: str) -> Path:
    text = "\n".join([
        "# Pose benchmark", "", f"Command: `{command}`", "", model_note, "",
        markdown_tables(summary), "",
        f"Settings: preset {args.preset}, {args.steps or 'preset'} steps per phase, seed {args.seed}; "
        f"{args.targets} target(s) per photo, {args.images} image(s) per target and condition, DDIM "
        f"{args.sample_steps} steps, guidance {args.guidance}. Pairs: (photo, target, seed). IoU: mean over "
        "subjects; a subject not drawn scores 0. BaS: Break-a-scene. Figure: figure.png (IoU under each image).",
        ""])
    path = out_dir / "results.md"
    path.write_text(text)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=int, default=2, help="photos per number of subjects")
    p.add_argument("--subjects", default="1,2,3", help="numbers of subjects, comma separated")
    p.add_argument("--targets", type=int, default=2, help="target poses per photo")
    p.add_argument("--images", type=int, default=2, help="seeds per target and condition")
    p.add_argument("--steps", type=int, default=None, help="steps of each phase (default: the preset's)")
    p.add_argument("--preset", default="toy-cpu")
    p.add_argument("--model", default="toy", help="'toy' (bundled) or a toy model folder")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0, help="as tools/eval_toy_base.py samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_pose"))
    p.add_argument("--figure-rows", type=int, default=12)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def _model_info(model: str):
    from lowmcgm.models import TOY_NAME
    from lowmcgm.toy.bundled import read_toy_info, require_toy_model

    return read_toy_info(require_toy_model() if model == TOY_NAME else Path(model))


def main(argv=None) -> dict:
    import diffusers.utils.logging
    import torch
    import transformers.utils.logging

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "tools/bench_pose.py", *argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    info = _model_info(args.model)
    size_px = info.image_size_px if info else 64
    note = (f"Model: {args.model}" + (f" ({info.capability_note()})" if info else "") + ".")
    if info and set(info.heldout_combos) != set(HELDOUT_COMBOS):
        note += (" Warning: this model's training did not hold out HELDOUT_COMBOS (toyworld.json "
                 "heldout_combos), so these photos are not held out for it.")
    # What a photo's figures depend on: a rerun that changes none of it reuses them.
    settings_key = {k: v for k, v in vars(args).items()
                    if k not in ("out", "figure_rows", "threads", "photos", "subjects")}
    settings_key["model_steps"] = [info.vae_steps, info.unet_steps] if info else None
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{command}\n{note}", flush=True)
    records = []
    for n in [int(s) for s in args.subjects.split(",")]:
        for photo in make_photos(n, args.photos, args.targets, size_px, args.seed):
            records.append(run_photo(photo, args.out / "photos" / photo.key, args, settings_key))
    summary = summarise(records)
    (args.out / "results.json").write_text(json.dumps({"command": command, "summary": summary,
                                                       "records": records}, indent=1) + "\n")
    render_figure(records, args.out, args.figure_rows).save(args.out / "figure.png")
    report = write_report(args.out, summary, command, args, note)
    print(markdown_tables(summary))
    print(f"Wrote {report}, {args.out / 'results.json'}, {args.out / 'figure.png'}")
    return summary


if __name__ == "__main__":
    main()
