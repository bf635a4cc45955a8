"""``lowmcgm demo``: MCGM learns a dog and a cat from one toy photo, then draws them in new poses.

The demo is ``lowmcgm run`` with inputs made here: the photo, one mask per subject, pose masks
and a prompts file are rendered from a fixed toy-world scene (a dog standing and a cat lying on
grass, the scene of ``examples/dogcat``) into ``<out>/inputs``, and a ``runs.command.RunCommand``
holds the run's flag values, from which come both its configuration (what the CLI hands to
``run.train_then_sample``) and the ``lowmcgm run`` command line shown to the user. Rendering at
run time rather than shipping PNGs keeps a fresh install self-contained (``examples/`` is not
installed), costs milliseconds, and draws the photo at the base model's own resolution; the scene
is fixed, so every demo trains on the same pixels.

This module owns the demo's scene, poses and prompts and the one-line note on what the bundled
toy weights can do; training and sampling are ``lowmcgm run``'s, unchanged.

Example::

    inputs = write_demo_inputs(Path("runs/demo/inputs"), size_px=64)
    run = demo_run(inputs, Path("runs/demo"), base_model="toy")
    cfg, argv = run.config(), run.command()   # a validated Config; ["run", "--preset", "toy-cpu", ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lowmcgm.models.base import TOY_NAME
from lowmcgm.models.tiny import TINY_NAMES
from lowmcgm.runs.command import RunCommand
from lowmcgm.runs.write_guard import write_text_whole
from lowmcgm.sampling.previews import save_png
from lowmcgm.toy.bundled import read_toy_info, require_toy_model
from lowmcgm.toy.scenes import Scene, handle_prompt, render_scene, save_mask
from lowmcgm.toy.silhouettes import Subject, render_pose_mask

DEMO_PRESET = "toy-cpu"
DEFAULT_SIZE_PX = 256  # bases without a toyworld.json: a sharp render, resized by the trainer

# Both subjects are held-out combinations (HELDOUT_COMBOS): the toy base model never saw a dog
# standing or a cat lying on grass captioned, so it has to learn them from this photo.
DEMO_SCENE = Scene(
    background="grass",
    subjects=[
        Subject("dog", "standing", x=0.27, y=0.86, scale=0.36, flip=False, texture_seed=11),
        Subject("cat", "lying", x=0.76, y=0.80, scale=0.35, flip=True, texture_seed=12),
    ],
    horizon=0.42,
    seed=2024,
)
HANDLES = ("<dog>", "<cat>")
INIT_WORDS = ("dog", "cat")
# New poses, each where its subject stands in the photo: file stem -> render_pose_mask arguments.
POSES = {
    "dog_sitting": dict(kind="dog", pose="sitting", x=0.27, y=0.86, scale=0.36, flip=False),
    "dog_running": dict(kind="dog", pose="running", x=0.27, y=0.86, scale=0.36, flip=False),
    "dog_jumping": dict(kind="dog", pose="jumping", x=0.30, y=0.86, scale=0.36, flip=False),
    "cat_running": dict(kind="cat", pose="running", x=0.76, y=0.82, scale=0.35, flip=True),
    "cat_sitting": dict(kind="cat", pose="sitting", x=0.76, y=0.82, scale=0.35, flip=True),
}
# (background, {handle: pose file stem}): the prompt names the handles in this order.
PROMPTS = (
    ("grass", {"<dog>": "dog_sitting", "<cat>": "cat_running"}),
    ("snow", {"<dog>": "dog_running", "<cat>": "cat_sitting"}),
    ("beach", {"<dog>": "dog_jumping"}),
)
# Sampling flags of the demo's run: the toy model's own evaluation samples at guidance 5.
SAMPLE_FLAGS = (("sample.num_images", 2), ("sample.steps", 25), ("sample.guidance_scale", 5))


@dataclass(frozen=True)
class DemoInputs:
    """The files ``write_demo_inputs`` wrote, as paths for ``lowmcgm run``."""

    photo: Path
    masks: tuple[Path, ...]
    poses: tuple[Path, ...]
    prompts: Path


def write_demo_inputs(folder: Path, size_px: int) -> DemoInputs:
    """Render the demo's photo, subject masks, pose masks and prompts file into ``folder``.

    Args:
        folder: created if missing; existing demo files are overwritten.
        size_px: side of the square photo and masks.

    Returns:
        The paths, in handle order for the masks.
    """
    inputs = demo_inputs(folder)
    inputs.prompts.parent.mkdir(parents=True, exist_ok=True)
    image, masks = render_scene(DEMO_SCENE, size_px)
    save_png(Image.fromarray(image), inputs.photo)
    for mask, path in zip(masks, inputs.masks):
        save_mask(mask, path)
    for spec, path in zip(POSES.values(), inputs.poses):
        save_mask(render_pose_mask(size_px=size_px, **spec), path)
    lines = ["# The demo's prompts: each handle posed by a mask in this folder (lowmcgm run --prompts)."]
    for background, poses in PROMPTS:
        text = handle_prompt(list(poses), background)
        lines.append(" | ".join([text] + [f"{h[1:-1]}={stem}.png" for h, stem in poses.items()]))
    write_text_whole(inputs.prompts, "\n".join(lines) + "\n")
    return inputs


def demo_inputs(folder: Path) -> DemoInputs:
    """Where ``write_demo_inputs`` writes its files in ``folder`` (nothing is written)."""
    folder = Path(folder)
    return DemoInputs(folder / "photo.png", tuple(folder / f"{s.kind}.png" for s in DEMO_SCENE.subjects),
                      tuple(folder / f"{name}.png" for name in POSES), folder / "prompts.txt")


def demo_run(inputs: DemoInputs, out: Path, base_model: str, overwrite: bool = False,
             pose_guidance: str = "") -> RunCommand:
    """The demo's run: learn the subjects of ``inputs`` on ``base_model``, sample its prompts into ``out``.

    Args:
        pose_guidance: the demo's ``--guidance``; empty leaves the preset's.
    """
    input_flags: list[tuple[str, Any]] = [("model.base_model", base_model), ("data.image", str(inputs.photo))]
    for mask, handle, word in zip(inputs.masks, HANDLES, INIT_WORDS):
        input_flags += [("data.masks", str(mask)), ("data.handles", handle), ("data.init_words", word)]
    output_flags = [*SAMPLE_FLAGS, ("output.out", str(out))]
    if pose_guidance:
        output_flags.append(("sample.pose_guidance", pose_guidance))
    return RunCommand(DEMO_PRESET, tuple(input_flags), tuple(output_flags), inputs.prompts, overwrite)


def describe_base(base_model: str) -> tuple[int, str | None]:
    """The photo size for ``base_model`` and, unless its weights passed their gate, a note on them.

    Returns:
        ``(size_px, note)``: the toy model's training size (else 64 for ``tiny``, else
        ``DEFAULT_SIZE_PX``), and one line on what the weights can and cannot do, or None.

    Raises:
        UserError: ``toy`` names the bundled model and this install has none.
    """
    if base_model in TINY_NAMES:
        return 64, (f"'{base_model}' has random weights: the demo shows the plumbing working, and its "
                    "images are noise.")
    if base_model == TOY_NAME:
        info = read_toy_info(require_toy_model())
    elif Path(base_model).expanduser().is_dir():
        info = read_toy_info(Path(base_model).expanduser())
    else:
        info = None
    if info is None:
        return DEFAULT_SIZE_PX, None
    return info.image_size_px, None if info.gate_passed else info.capability_note()
