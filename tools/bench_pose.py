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
- Training, same seed, steps and preset (``toy-cpu``), one run per variant in ``TRAININGS``:
  Break-a-scene (``loss.use_mask_tokens=false``), MCGM as in the paper, and MCGM with mask-aware
  training (``MASK_AWARE``).
- Sampling, ``--images`` seeds per target, the same seeds everywhere, one column per condition in
  ``CONDITIONS``: each variant without guidance, with the pose masks (Break-a-scene gets none, MCGM
  also with blank masks), and each variant with pose guidance (``--guidance-modes``), which needs
  the pose masks in every variant. Sampling time per image is recorded per condition.

Measured on every image with the toy world's segmentation (``lowmcgm.toy.metrics``):

- pose adherence: IoU of each subject's silhouette (``kind_mask`` on ``foreground_mask``) with its
  target mask; a subject that is not drawn (``metrics.subject_drawn``: no blob of its colours
  holding most of them, or an image that is noise or a colour wash) scores 0. For reference,
  ``copy`` is the IoU a model would get by redrawing the photo's pose unchanged.
- identity: RGB distance between the mean colours of the generated and the source subject (drawn
  subjects only; lower is better).
- prompt following: the background class is the prompt's.

Writes ``results.md`` (tables and the command), ``results.json`` (every image's figures),
``figure.png`` (source, target masks, outputs side by side), ``before_after.png`` (MCGM without and
with the default pose guidance, or ``--before-after``'s, same seeds; ``before_after_two.png`` the
two-subject photos alone) and every image under ``photos/``.
Each photo's figures are kept in ``photos/<id>/record.json``: a rerun with the same settings and
``--out`` reuses them, so a long run that was stopped continues where it was.

``--rescore`` with the arguments of an earlier run re-measures the images it kept with the current
``lowmcgm.toy.metrics`` (no training, no sampling) and rewrites its records, tables and figures:

    python tools/bench_pose.py --photos 2 --out runs/bench_pose --rescore
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.toy import metrics  # noqa: E402
from lowmcgm.toy.scenes import (  # noqa: E402
    BACKGROUNDS,
    HELDOUT_COMBOS,
    PALETTES,
    Scene,
    handle_prompt,
    render_scene,
    sample_scene,
    save_mask,
    scene_combos,
)
from lowmcgm.toy.silhouettes import POSES, render_pose_mask, sample_offsets  # noqa: E402

BENCH_SEED = 9_100_003  # photo streams: [BENCH_SEED, --seed, subjects]; no training stream uses it
# Training variants: config overrides on top of the preset.
TRAININGS = {"break_a_scene": {"loss.use_mask_tokens": False}, "mcgm": {}}
# Mask-aware training: every option on (augmentation, dropout to the blank mask, perturbed encoder
# input, encoder on the handles' scale); see docs/method.md.
MASK_AWARE: dict[str, object] = {"data.use_affine_augmentation": True, "data.mask_dropout": 0.15,
                                  "data.use_mask_perturbation": True, "loss.mask_encoder_input": "area_normalized",
                                  "loss.mask_token_norm": "layernorm"}
TRAININGS["mcgm_aware"] = {**TRAININGS["mcgm"], **MASK_AWARE}


@dataclass(frozen=True)
class Condition:
    """One column of the tables: a training variant sampled one way."""

    name: str
    training: str  # a key of TRAININGS
    poses: bool  # the target pose masks are given (else every handle gets the blank mask)
    guidance: str = "none"  # pose guidance mode at sampling
    label: str = ""
    # Other [sample] settings of the guidance, by field name without "pose_guidance_" ("strength",
    # "step", "iterations", ...), as parsed from a --guidance-modes entry.
    options: tuple[tuple[str, object], ...] = ()


def parse_guidance_spec(spec: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """``latent:step=noise-scaled:strength=30`` -> the mode and its settings, each value of its
    ``SampleSettings.pose_guidance_<key>`` field's type.

    Raises:
        SystemExit: an unknown mode or setting, or a value of the wrong type.
    """
    from lowmcgm.config import SampleSettings

    mode, *pairs = spec.split(":")
    if mode not in ("attention", "latent"):
        raise SystemExit(f"--guidance-modes: unknown mode '{mode}' in '{spec}' (attention or latent)")
    options = []
    for pair in pairs:
        key, _, text = pair.partition("=")
        name = f"pose_guidance_{key}"
        if not hasattr(SampleSettings, name) or not text:
            raise SystemExit(f"--guidance-modes: '{pair}' in '{spec}' is not KEY=VALUE of a sample.pose_guidance_* "
                             "setting (strength, steps, step, layers, iterations, threshold, separation, "
                             "presence, area_normalized, bias)")
        kind = type(getattr(SampleSettings, name))
        try:
            value = {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise SystemExit(f"--guidance-modes: '{text}' is not a {kind.__name__} (in '{spec}')") from None
        options.append((key, value))
    return mode, tuple(options)


def conditions_for(guidance_modes: list[str], trainings: list[str] | None = None,
                   guide_bas: bool = True) -> list[Condition]:
    """The ablation's conditions, Break-a-scene first (every "beats" share is against it).

    Args:
        guidance_modes: per guided column set, a mode with optional settings
            (``parse_guidance_spec``); each is sampled on every training.
        trainings: the keys of TRAININGS to train (Break-a-scene always).
        guide_bas: sample Break-a-scene with each guidance too (a sweep of MCGM's guidance
            settings can leave it out).
    """
    labels = {"break_a_scene": "BaS", "mcgm": "MCGM", "mcgm_aware": "MCGM+aware"}
    trainings = ["break_a_scene"] + [t for t in (trainings or TRAININGS) if t != "break_a_scene"]
    out = [Condition("break_a_scene", "break_a_scene", False, label="BaS")]
    if "mcgm" in trainings:
        out.append(Condition("mcgm_blank", "mcgm", False, label="MCGM blank"))
    for training in trainings:
        if training != "break_a_scene":
            out.append(Condition(training, training, True, label=labels[training]))
    for spec in guidance_modes:
        mode, options = parse_guidance_spec(spec)
        for training in trainings:
            if guide_bas or training != "break_a_scene":
                out.append(Condition(f"{training}+{spec}", training, True, mode, f"{labels[training]}+{spec}",
                                     options))
    return out


CONDITIONS = conditions_for(["attention", "latent"])  # the default --guidance-modes; main() rebuilds it
# A subject hidden behind others for more than this share of its silhouette is redrawn elsewhere:
# its mask would teach too few pixels and its IoU would measure occlusion.
MAX_HIDDEN_FRACTION = 0.3
MAX_SCENE_TRIES = 20_000


@dataclass
class Target:
    """New poses for every subject of a photo, and the prompt's background."""

    poses: list[str]
    masks: list[np.ndarray]  # (S, S) bool per subject
    background: str
    own: bool = False  # the photo's own poses (--own-pose): guidance must not make them worse


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


def make_photos(n_subjects: int, count: int, targets: int, size_px: int, seed: int,
                own_pose: bool = False) -> list[BenchPhoto]:
    """``count`` held-out photos of ``n_subjects`` subjects, ``targets`` targets each (deterministic),
    plus with ``own_pose`` one more whose masks are the photo's own (and a new background)."""
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
        if own_pose:  # drawn after the others, so that they stay as without the flag
            background = str(rng.choice([b for b in BACKGROUNDS if b != scene.background]))
            photo_targets.append(Target([s.pose for s in scene.subjects], masks, background, own=True))
        photos.append(BenchPhoto(f"s{n_subjects}-p{i:02d}", scene, image, masks, photo_targets))
    return photos


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
        present = metrics.subject_drawn(image, fg, silhouette)
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

def train_and_sample(photo: BenchPhoto, training: str, conditions: list[Condition], folder: Path,
                     args: argparse.Namespace, files: dict) -> tuple[dict, dict]:
    """Train the ``training`` variant on the photo; sample every target under each of ``conditions``.

    Returns:
        condition -> per target, the images (one per seed, (S, S, 3) uint8); and condition ->
        sampling seconds per image.
    """
    from lowmcgm.artifact import load_artifact
    from lowmcgm.config import SampleSettings, config_from_dict, resolve_config
    from lowmcgm.models.loading import load_base_model
    from lowmcgm.sampling.prompts import Pose, PromptSpec, no_mask_reason, plan_prompts
    from lowmcgm.sampling.sampler import build_sampler
    from lowmcgm.training.trainer import train

    overrides = {
        "model.base_model": args.model, "data.image": files["photo"], "data.masks": files["masks"],
        "data.init_words": photo.kinds, "output.out": str(folder / training), "train.seed": args.seed,
        "train.checkpoint_every": 0, **TRAININGS[training],
    }
    if args.steps is not None:
        overrides |= {"train.phase1_steps": args.steps, "train.phase2_steps": args.steps}
    cfg = resolve_config(args.preset, None, overrides)
    base = load_base_model(args.model)
    artifact_path = Path(cfg.output.out) / cfg.output.artifact_name
    # An artifact trained with these very settings (an earlier run that sampled otherwise) is reused.
    if not (artifact_path.is_file()
            and config_from_dict(load_artifact(artifact_path).meta.get("training_config", {})) == cfg):
        shutil.rmtree(cfg.output.out, ignore_errors=True)
        artifact_path = train(cfg, base=base)  # leaves the base as it came: sampling installs the artifact
    artifact = load_artifact(artifact_path)
    size = int(photo.image.shape[0])
    plain = SampleSettings(num_images=args.images, seed=0, steps=args.sample_steps, guidance_scale=args.guidance,
                           scheduler="ddim", height=size, width=size, dtype="fp32")
    sampler = build_sampler(base, artifact, plain)
    handles = artifact.handles
    images: dict[str, list[list[np.ndarray]]] = {c.name: [] for c in conditions}
    seconds: dict[str, float] = {}
    for condition in conditions:
        # A condition's own settings win over --guidance-strength.
        options = {"pose_guidance_strength": args.guidance_strength,
                   **{f"pose_guidance_{k}": v for k, v in condition.options}}
        settings = dataclasses.replace(plain, pose_guidance=condition.guidance, **options)
        started = time.perf_counter()
        for t, target in enumerate(photo.targets):
            # The target masks as arrays (their files are the record's, never read back here).
            poses = ({h: Pose(m, f) for h, m, f in zip(handles, target.masks, files["targets"][t])}
                     if condition.poses else {})
            plan = plan_prompts([PromptSpec(handle_prompt(handles, target.background), poses, where=f"target {t}")],
                                {}, handles, no_mask_reason(settings, artifact), guided=condition.guidance != "none")[0]
            generated = sampler.generate(plan, list(range(args.images)), settings)
            images[condition.name].append([np.asarray(im.convert("RGB")) for im in generated])
        seconds[condition.name] = (time.perf_counter() - started) / (len(photo.targets) * args.images)
    return images, seconds


def rescore_photo(photo: BenchPhoto, folder: Path, settings_key: dict) -> dict:
    """Measure the images an earlier run kept for ``photo`` again, and rewrite its ``record.json``.

    Raises:
        SystemExit: the folder holds no record of a run with these settings.
    """
    record_path = folder / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("settings") != settings_key:
        raise SystemExit(f"{folder} holds no record of a run with these settings: --rescore takes the "
                         "arguments of the run whose images it re-measures")
    for row in record["images"]:
        image = np.asarray(Image.open(folder / row["file"]).convert("RGB"))
        row.update(measure(image, photo, photo.targets[row["target"]]))
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


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
             "masks": [save_mask(m, folder / f"mask{j}.png") for j, m in enumerate(photo.masks)],
             "targets": [[save_mask(m, folder / f"target{t}-{j}.png") for j, m in enumerate(target.masks)]
                         for t, target in enumerate(photo.targets)]}
    images, seconds = {}, {}
    for training in dict.fromkeys(c.training for c in CONDITIONS):
        started = time.perf_counter()
        wanted = [c for c in CONDITIONS if c.training == training]
        got, took = train_and_sample(photo, training, wanted, folder, args, files)
        images |= got
        seconds |= took
        print(f"  {photo.key} {training}: {time.perf_counter() - started:.0f} s", flush=True)
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
        "targets": [{"poses": t.poses, "background": t.background, "own": t.own,
                     "copy_iou": [metrics.iou(m, g) for m, g in zip(photo.masks, t.masks)]}
                    for t in photo.targets],
        "images": rows, "sample_seconds_per_image": seconds,
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------------------------
# Summary, tables and figure.

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(records: list[dict]) -> dict:
    """Per number of subjects (and ``all``): the tables' figures, per condition, over the new
    poses; ``own``: over the photos' own poses (``--own-pose``), when there are any."""
    names = [c.name for c in CONDITIONS]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record["subjects"]), []).append(record)
    groups["all"] = records
    if any(t.get("own") for r in records for t in r["targets"]):
        groups["own"] = records
    summary = {}
    for group, recs in groups.items():
        by_pair: dict[tuple, dict[str, dict]] = {}
        copy = []
        for rec in recs:
            own = [bool(t.get("own")) for t in rec["targets"]]
            for row in rec["images"]:
                if own[row["target"]] == (group == "own"):
                    by_pair.setdefault((rec["key"], row["target"], row["seed"]), {})[row["condition"]] = row
            for t in rec["targets"]:
                if bool(t.get("own")) == (group == "own"):
                    copy.append(float(np.mean(t["copy_iou"])))
        pairs = [p for p in by_pair.values() if set(names) <= set(p)]
        iou = {c: np.array([float(np.mean(p[c]["iou"])) for p in pairs]) for c in names}
        entry = {"photos": len(recs), "pairs": len(pairs), "copy_iou": _mean(copy)}
        for c in names:
            rows = [p[c] for p in pairs]
            entry[c] = {
                "iou": _mean(iou[c].tolist()),
                "drawn": _mean([float(d) for r in rows for d in r["drawn"]]),
                "colour_distance": _mean([d for r in rows for d in r["colour_distance"]]),
                "background_ok": _mean([float(r["background_ok"]) for r in rows]),
                "beats_bas": float(np.mean(iou[c] > iou["break_a_scene"])) if pairs else None,
                "ties_bas": float(np.mean(iou[c] == iou["break_a_scene"])) if pairs else None,
                "seconds_per_image": _mean([r.get("sample_seconds_per_image", {}).get(c) for r in recs]),
            }
        summary[group] = entry
    return summary


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if percent else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def markdown_tables(summary: dict) -> str:
    groups = [n for n in ("1", "2", "3") if n in summary] + ["all"] + (["own"] if "own" in summary else [])
    lines = []
    for group in groups:
        e = summary[group]
        unguided = {c.training: e[c.name]["seconds_per_image"] for c in CONDITIONS if c.guidance == "none"}
        lines += [f"Subjects: {group} ({e['photos']} photos, {e['pairs']} pairs; IoU if the source pose is "
                  f"copied: {_fmt(e['copy_iou'])})", "",
                  "| condition | pose IoU | beats BaS (ties) | subjects drawn | colour distance | "
                  "background as prompted | s per image (x unguided) |", "|---|---|---|---|---|---|---|"]
        for c in CONDITIONS:
            f = e[c.name]
            base_time = unguided.get(c.training)
            ratio = (f" (x{f['seconds_per_image'] / base_time:.2f})" if c.guidance != "none" and base_time
                     and f["seconds_per_image"] else "")
            beats = "-" if c.name == "break_a_scene" else f"{_fmt(f['beats_bas'], True)} ({_fmt(f['ties_bas'], True)})"
            lines.append(f"| {c.label} | {_fmt(f['iou'])} | {beats} | {_fmt(f['drawn'], True)} | "
                         f"{_fmt(f['colour_distance'])} | {_fmt(f['background_ok'], True)} | "
                         f"{_fmt(f['seconds_per_image'])}{ratio} |")
        lines.append("")
    return "\n".join(lines)


def _composite(photo_kinds: list[str], masks: list[np.ndarray]) -> Image.Image:
    """Target masks on black, each in its kind's main colour (so two subjects read apart)."""
    out = np.zeros(masks[0].shape + (3,), np.uint8)
    for kind, mask in zip(photo_kinds, masks):
        out[mask] = PALETTES[kind][0]
    return Image.fromarray(out)


def render_figure(records: list[dict], out_dir: Path, max_rows: int,
                  conditions: list[Condition] | None = None) -> Image.Image:
    """Rows of source photo, target masks, then seed 0 of each condition (default: all)."""
    from lowmcgm.sampling.previews import SheetRow, render_contact_sheet

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
            for c in conditions or CONDITIONS:
                r = by_condition[c.name]
                row.images.append((f"{c.label} {np.mean(r['iou']):.2f}", Image.open(folder / r["file"])))
            rows.append(row)
    return render_contact_sheet(rows)


def write_report(out_dir: Path, summary: dict, command: str, args: argparse.Namespace, model_note: str) -> Path:
    text = "\n".join([
        "# Pose benchmark", "", f"Command: `{command}`", "", model_note, "",
        markdown_tables(summary), "",
        f"Settings: preset {args.preset}, {args.steps or 'preset'} steps per phase, seed {args.seed}; "
        f"{args.targets} target(s) per photo, {args.images} image(s) per target and condition, DDIM "
        f"{args.sample_steps} steps, guidance {args.guidance}, pose guidance strength "
        f"{args.guidance_strength or 'default'} over the first half of the steps. "
        "Pairs: (photo, target, seed). IoU: mean over subjects; a subject not drawn scores 0. BaS: "
        "Break-a-scene (no pose masks); MCGM blank: blank masks; +attention/+latent: pose guidance with "
        "the target masks. Figure: figure.png (IoU under each image).",
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
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale, as "
                   "tools/eval_toy_base.py samples")
    p.add_argument("--guidance-modes", default="attention,latent",
                   help="pose guidance modes to ablate, comma separated ('' for none); each may carry "
                        "sample.pose_guidance_* settings: latent:step=noise-scaled:strength=30:iterations=5")
    p.add_argument("--no-bas-guidance", action="store_true",
                   help="sample Break-a-scene without pose guidance only (a sweep of MCGM's guidance settings)")
    p.add_argument("--trainings", default=",".join(TRAININGS),
                   help=f"training variants, comma separated, of {', '.join(TRAININGS)} (Break-a-scene always)")
    p.add_argument("--guidance-strength", type=float, default=0.0,
                   help="pose guidance strength of the guided conditions (0: each mode's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--own-pose", action="store_true",
                   help="one more target per photo: the photo's own masks (guidance must not make them worse); "
                        "tabled apart as 'own'")
    p.add_argument("--out", type=Path, default=Path("runs/bench_pose"))
    p.add_argument("--figure-rows", type=int, default=12)
    p.add_argument("--before-after", default="",
                   help="the guided condition of before_after.png, as in --guidance-modes (default: the default mode)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--rescore", action="store_true",
                   help="re-measure the images kept in --out by a run with these same arguments (no "
                        "training or sampling), then rewrite its records, tables and figures")
    return p.parse_args(argv)


def _model_info(model: str):
    from lowmcgm.models.base import TOY_NAME
    from lowmcgm.toy.bundled import read_toy_info, require_toy_model

    return read_toy_info(require_toy_model() if model == TOY_NAME else Path(model))


def main(argv=None) -> dict:
    import diffusers.utils.logging
    import torch
    import transformers.utils.logging

    from lowmcgm.config import SampleSettings

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "tools/bench_pose.py", *argv])
    global CONDITIONS
    trainings = [t for t in args.trainings.split(",") if t]
    unknown = set(trainings) - set(TRAININGS)
    if unknown:
        raise SystemExit(f"--trainings: unknown {', '.join(sorted(unknown))} (of {', '.join(TRAININGS)})")
    CONDITIONS = conditions_for([m for m in args.guidance_modes.split(",") if m], trainings,
                                guide_bas=not args.no_bas_guidance)
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
                    if k not in ("out", "figure_rows", "before_after", "threads", "photos", "subjects", "rescore")}
    settings_key["model_steps"] = [info.vae_steps, info.unet_steps] if info else None
    settings_key["trainings"] = {t: TRAININGS[t] for t in dict.fromkeys(c.training for c in CONDITIONS)}
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{command}\n{note}", flush=True)
    records = []
    for n in [int(s) for s in args.subjects.split(",")]:
        for photo in make_photos(n, args.photos, args.targets, size_px, args.seed, args.own_pose):
            folder = args.out / "photos" / photo.key
            records.append(rescore_photo(photo, folder, settings_key) if args.rescore
                           else run_photo(photo, folder, args, settings_key))
    summary = summarise(records)
    (args.out / "results.json").write_text(json.dumps({"command": command, "summary": summary,
                                                       "records": records}, indent=1) + "\n")
    render_figure(records, args.out, args.figure_rows).save(args.out / "figure.png")
    # The same seeds with and without the default pose guidance (the README's before/after), for
    # every photo and for the two-subject ones alone.
    after = f"mcgm+{args.before_after or SampleSettings.pose_guidance}"
    pair = [c for c in CONDITIONS if c.name in ("mcgm", after)]
    if len(pair) == 2:
        render_figure(records, args.out, args.figure_rows, pair).save(args.out / "before_after.png")
        two = [r for r in records if r["subjects"] == 2]
        if two:
            render_figure(two, args.out, args.figure_rows, pair).save(args.out / "before_after_two.png")
    report = write_report(args.out, summary, command, args, note)
    print(markdown_tables(summary))
    print(f"Wrote {report}, {args.out / 'results.json'}, {args.out / 'figure.png'}")
    return summary


if __name__ == "__main__":
    main()
