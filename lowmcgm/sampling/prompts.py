"""Prompts and their poses for sampling: read them, pair each pose mask with its handle, check them early.

Owns ``--prompt``, ``--prompts FILE`` and ``--pose HANDLE=FILE`` as the user wrote them
(``PromptSpec``), and the checked plan of each prompt (``PlannedPrompt``): its handles in token order
and the pose paired with each *by name* (MCGM-Styler pairs masks with concepts by an unsorted file
listing). Everything here runs before any weights load, so a bad prompt or pose file fails in a
second; what needs the model (the token window, the crop of the image size) takes it as an argument.
Sampling itself is ``sampler.py``'s.

Example:
    >>> specs = load_prompts_file("poses/prompts.txt")   # one line: 'a photo of <asset0> | asset0=run.png'
    >>> plans = plan_prompts(specs, parse_poses([]), ["<asset0>", "<asset1>"], no_masks_because=None)
    >>> plans[0].poses
    {'<asset0>': 'poses/run.png'}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
import torch
from PIL import Image

from lowmcgm.config import SampleSettings
from lowmcgm.data import build_prompt, check_center_crop_keeps, load_mask
from lowmcgm.errors import UserError
from lowmcgm.handles import HANDLE_PATTERN
from lowmcgm.limits import read_text_file
from lowmcgm.models.prompt_length import check_handles_fit

if TYPE_CHECKING:
    from lowmcgm.artifact import Artifact
    from lowmcgm.models.base import BaseModel

ProgressFn = Callable[[dict[str, Any]], None]
ALL_HANDLES = "all"  # --pose all=FILE: one mask for every handle of the prompt (the paper's fig. 6)
HANDLE_IN_TEXT = re.compile(r"<[A-Za-z0-9_\-]{1,32}>")  # the names handles.HANDLE_PATTERN allows


@dataclass(frozen=True, eq=False)
class Pose:
    """A pose given as an array rather than a file (the page's canvases, the pose benchmark's targets).

    Attributes:
        mask: (H, W), the subject where it is above 0.5 (bool or float in [0, 1]).
        name: what messages and records call it: the file the caller keeps it in, or a description.
    """

    mask: np.ndarray
    name: str


PoseSource = Union[str, Pose]  # a mask file (read when prompts are planned) or the mask itself


def pose_name(source: PoseSource) -> str:
    return source.name if isinstance(source, Pose) else source


@dataclass(frozen=True)
class PromptSpec:
    """A prompt as the user wrote it, with the poses given on its own line (``--prompts FILE``).

    Attributes:
        text: the prompt, e.g. ``a photo of <asset0> on the beach``.
        poses: handle (``<asset0>`` or ``all``) -> mask file, or the mask as a ``Pose``.
        where: where it came from, for messages (``--prompt 1``, ``prompts.txt line 3``).
        file: the prompts file it was read from, or '' (an input no output may replace).
    """

    text: str
    poses: dict[str, PoseSource] = field(default_factory=dict)
    where: str = "--prompt"
    file: str = ""


@dataclass
class PlannedPrompt:
    """A checked prompt: its handles in token order and the pose paired with each, by name.

    Attributes:
        handles: distinct handles in order of first appearance: the order of the mask tokens.
        pose_files: per handle, its mask file (a ``Pose``'s name), or None for the blank (all-zero) mask.
        pose_masks: per handle, the (H, W) bool mask as drawn, or None.
        use_mask_tokens: False with --no-mask or an artifact trained without mask tokens.
    """

    text: str
    handles: list[str]
    pose_files: list[str | None]
    pose_masks: list[np.ndarray | None]
    use_mask_tokens: bool
    where: str = ""  # where the prompt came from, for messages (``--prompt 2``)
    # The poses fitted to each sampling size, fitted once (``fit_pose_masks``): the mask tokens, the
    # guidance and the pose pictures all read them.
    # Each size keeps the mask arrays it was fitted from (identity, not id(): an id can be reused).
    fitted: dict[tuple[int, int], tuple[list[np.ndarray | None], torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False)

    @property
    def poses(self) -> dict[str, str]:
        """handle -> mask file or ``blank``, as recorded in PNGs and samples.json ({} without tokens)."""
        if not self.use_mask_tokens and not any(f is not None for f in self.pose_files):
            return {}  # no mask tokens and no guidance: poses play no part
        return {h: f if f is not None else "blank" for h, f in zip(self.handles, self.pose_files)}


def normalize_handle(name: str) -> str:
    """``asset0`` or ``<asset0>`` -> ``<asset0>``; ``all`` stays ``all``."""
    name = name.strip()
    if name == ALL_HANDLES or name.startswith("<"):
        return name
    return f"<{name}>"


def parse_poses(items: list[str], where: str = "--pose", relative_to: Path | None = None) -> dict[str, str]:
    """Parse ``HANDLE=FILE`` items into handle -> file.

    Args:
        items: e.g. ``["asset0=run.png", "<asset1>=sit.png", "all=jump.png"]``.
        where: the flag or file line they came from, for messages.
        relative_to: folder that relative file names are taken from (a prompts file's own).
    """
    poses: dict[str, str] = {}
    for item in items:
        raw, sep, path = item.partition("=")
        handle, path = normalize_handle(raw), path.strip()
        if not sep or not raw.strip() or not path:
            raise UserError(f"{where} takes HANDLE=FILE, got '{item.strip()}' (e.g. asset0=running.png, "
                            "or all=running.png for every handle).")
        if handle != ALL_HANDLES and not HANDLE_PATTERN.match(handle):
            raise UserError(f"{where}: '{raw.strip()}' is not a handle name (e.g. asset0 or <asset0>).")
        if handle in poses:
            raise UserError(f"{where} gives two poses for {handle}: keep one.")
        if relative_to is not None and not Path(path).expanduser().is_absolute():
            path = str(relative_to / path)
        poses[handle] = path
    return poses


def load_prompts_file(path: str | Path) -> list[PromptSpec]:
    """Read ``--prompts FILE``: one prompt a line, optionally ``| HANDLE=FILE`` poses after it.

    Blank lines and lines starting with ``#`` are skipped. Pose files are taken relative to the
    prompts file's folder, so a folder of prompts and masks can move as one.

    Example line: ``a photo of <asset0> on the beach | asset0=run.png | asset1=sit.png``.
    """
    path = Path(path).expanduser()
    try:
        lines = read_text_file(path, "Prompts file").splitlines()
    except FileNotFoundError as exc:
        raise UserError(f"Prompts file not found: {path}.") from exc
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise UserError(f"Prompts file {path} is not a UTF-8 text file.") from exc
    except OSError as exc:
        raise UserError(f"Prompts file {path} cannot be read ({exc.strerror or exc}).") from exc
    specs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text, *pose_items = line.split("|")
        where = f"{path.name} line {number}"
        if not text.strip():
            raise UserError(f"{where} has poses but no prompt before the first '|'.")
        specs.append(PromptSpec(text.strip(), parse_poses(pose_items, where, relative_to=path.parent), where,
                                file=str(path)))
    if not specs:
        raise UserError(f"Prompts file {path} has no prompts (one per line).")
    return specs


def training_prompt_spec(handles: list[str], mask_files: list[str]) -> PromptSpec:
    """The training prompt with every handle, posed by its training mask (``run`` without --prompt)."""
    return PromptSpec(build_prompt(handles), dict(zip(handles, mask_files)), where="the training prompt")


def handles_in_text(text: str) -> list[str]:
    """Distinct ``<...>`` names in order of first appearance."""
    return list(dict.fromkeys(HANDLE_IN_TEXT.findall(text)))


def no_mask_reason(settings: SampleSettings, artifact: Artifact | None = None,
                   trained_with_mask_tokens: bool = True) -> str | None:
    """Why no mask tokens are appended (a phrase for messages), or None when they are."""
    if not settings.use_mask_tokens:
        return "--no-mask drops the mask tokens"
    if (artifact is not None and not artifact.uses_mask_tokens) or not trained_with_mask_tokens:
        return "this artifact was trained without mask tokens (loss.use_mask_tokens off)"
    return None


def plan_prompts(specs: list[PromptSpec], poses: dict[str, PoseSource], handles: list[str],
                 no_masks_because: str | None, guided: bool = False) -> list[PlannedPrompt]:
    """Check prompts and poses against the artifact's handles and pair each pose with its handle.

    A handle takes, in order: its own pose on the prompt's line, the line's ``all``, its
    ``--pose``, ``--pose all=``, else the blank mask. Pose files are read here, before any
    weights load, so a bad file fails in a second; a ``Pose`` is taken as it is, never written
    and read back.

    Args:
        specs: the prompts, each with the poses of its own line.
        poses: the ``--pose`` items, for every prompt.
        handles: the artifact's handles.
        no_masks_because: from ``no_mask_reason``; poses are refused when set, unless ``guided``.
        guided: pose guidance is on (``--guidance``), which uses poses without mask tokens too.

    Raises:
        UserError: a handle the artifact lacks, in a prompt or a pose; a pose no prompt can use;
            a pose file that is not a readable, non-empty mask.
    """
    if not specs:
        raise UserError("No prompt: pass --prompt TEXT (repeatable) or --prompts FILE.")
    known = ", ".join(handles)
    for where, given in [("--pose", poses)] + [(s.where, s.poses) for s in specs]:
        for handle, source in given.items():
            if handle != ALL_HANDLES and handle not in handles:
                raise UserError(f"{where}: a pose for {handle}, but this artifact has no such handle "
                                f"(it has {known}).")
            if no_masks_because and not guided:
                raise UserError(f"{no_masks_because}, so the pose {handle}={pose_name(source)} ({where}) would have no "
                                "effect: drop the pose, or guide by it with --guidance attention or latent.")
    named_anywhere: set[str] = set()
    cache: dict[str, np.ndarray] = {}
    plans = []
    for spec in specs:
        named = handles_in_text(spec.text)
        for handle in named:
            if handle not in handles:
                raise UserError(f"{spec.where} names {handle}, which this artifact does not have "
                                f"(it has {known}).")
        for handle in spec.poses:
            if handle != ALL_HANDLES and handle not in named:
                raise UserError(f"{spec.where} gives a pose for {handle}, but its prompt does not name it.")
        named_anywhere.update(named)
        sources = [spec.poses.get(h, spec.poses.get(ALL_HANDLES, poses.get(h, poses.get(ALL_HANDLES))))
                   for h in named]
        masks = [_read_pose(f, h, cache) if f is not None else None for h, f in zip(named, sources)]
        files = [pose_name(f) if f is not None else None for f in sources]
        plans.append(PlannedPrompt(spec.text, named, files, masks, use_mask_tokens=no_masks_because is None,
                                   where=spec.where))
    for handle, source in poses.items():
        if handle != ALL_HANDLES and handle not in named_anywhere:
            raise UserError(f"--pose {handle}={pose_name(source)}: no prompt names {handle}.")
    return plans


def _read_pose(source: PoseSource, handle: str, cache: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(source, Pose):
        mask = np.asarray(source.mask)
        if mask.ndim != 2 or not mask.size:
            raise UserError(f"Pose {source.name} for {handle} is not a 2-D mask (its shape is {list(mask.shape)}).")
        mask = mask > 0.5
        if not mask.any():
            raise UserError(f"Pose {source.name} for {handle} is empty (no pixel above 0.5): draw the subject, "
                            "or give no pose for the blank mask.")
        return mask
    path = source
    if path not in cache:
        try:
            mask = load_mask(Path(path).expanduser()) > 0.5
        except UserError as exc:
            raise UserError(f"Pose for {handle}: {exc}") from exc
        if not mask.any():
            raise UserError(f"Pose file {path} for {handle} is empty (no pixel above 0.5): draw the subject "
                            "white on black, or give no pose for the blank mask.")
        cache[path] = mask
    return cache[path]


def fit_pose_masks(plan: PlannedPrompt, height: int, width: int) -> torch.Tensor:
    """Each handle's pose resized to cover (height, width) and center-cropped, as training crops.

    Fitted once per size and kept on the plan: callers read the tensor, never write it.

    Returns:
        (k, height, width) float32 in {0, 1}; the blank mask is all zeros.
    """
    # A plan whose pose_masks were given other arrays since is fitted again.
    masks, tensor = plan.fitted.get((height, width), ([], None))
    same = len(masks) == len(plan.pose_masks) and all(a is b for a, b in zip(masks, plan.pose_masks))
    if tensor is None or not same:
        tensor = _fit(plan, height, width)
        plan.fitted[(height, width)] = (list(plan.pose_masks), tensor)
    return tensor


def _fit(plan: PlannedPrompt, height: int, width: int) -> torch.Tensor:
    out = torch.zeros(len(plan.handles), height, width)
    for i, mask in enumerate(plan.pose_masks):
        if mask is None:
            continue
        h, w = mask.shape
        scale = max(width / w, height / h)
        size = (max(width, round(w * scale)), max(height, round(h * scale)))
        big = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        crop = big.crop((left, top, left + width, top + height))
        out[i] = torch.from_numpy(np.asarray(crop) > 127).float()
    return out


def check_pose_crops(plans: list[PlannedPrompt], height: int, width: int) -> None:
    """Refuse a pose whose subject the centre crop to (height, width) cuts away, as training refuses a mask."""
    for plan in plans:
        for handle, file, mask in zip(plan.handles, plan.pose_files, plan.pose_masks):
            if mask is not None:  # used by a mask token or by pose guidance alike
                check_center_crop_keeps(mask, width, height, f"Pose {file} for {handle}")


def check_plans_fit(plans: list[PlannedPrompt], base: BaseModel, report: ProgressFn | None = None) -> None:
    """Refuse handles past the text encoder's token window (see ``prompt_length``); warn about cut prompts."""
    def warn(text: str) -> None:
        if report is not None:
            report({"kind": "message", "level": "warning", "text": text})

    check_handles_fit([(plan.where or "the prompt", plan.text, plan.handles) for plan in plans], base.tokenizer, warn)
