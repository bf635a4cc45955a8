"""The toy base model bundled with lowmcgm: where it lives, loading it, what it is known to do.

``--base-model toy`` is a tiny Stable Diffusion (the same diffusers and transformers classes)
trained from scratch on the toy world (``lowmcgm/toy/scenes.py``) by ``tools/train_toy_base.py``. Its
diffusers folder ships inside the package at ``lowmcgm/toy/weights/``, saved in fp16 to stay
small, with ``toyworld.json`` beside it: the image size, training steps, held-out combinations and,
once ``tools/eval_toy_base.py --record`` has measured it, the gate figures and whether the model
passed its gate (issue 7: background and kind right >= 90%, VAE PSNR >= 30 dB).

This module owns that folder and that file; ``models.loading.load_base_model("toy")`` comes here; the
folder is read like any other diffusers folder.

Example::

    info = load_toy_info()            # None when the weights are not bundled
    base = load_toy_base()            # fp32 BaseModel named "toy"
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmcgm.errors import UserError
from lowmcgm.models.base import TOY_NAME, BaseModel
from lowmcgm.models.folder import check_folder_layout, load_folder

INFO_FILE = "toyworld.json"
# tools/train_toy_base.py's default (ToyConfig.image_size_px), for a toyworld.json that omits it.
DEFAULT_IMAGE_SIZE_PX = 64


def toy_model_dir() -> Path:
    """The folder of the bundled toy model (it may be absent: see ``load_toy_base``)."""
    return Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ToyInfo:
    """What ``toyworld.json`` says about a toy model folder.

    Attributes:
        image_size_px: the side of the images it was trained on.
        attn_loss_downscale: latent side / side of the maps the attention losses should read.
        vae_steps, unet_steps: training steps of each stage (None: stage not trained).
        heldout_combos: (kind, pose, background) triples its training captions never showed.
        gate: per gate criterion, whether it passed (empty until measured).
        gate_passed: every criterion measured and passed.
        evaluation: the recorded gate figures (background_acc, kind_acc, psnr_db, ...), or {}.
        raw: the whole file.
    """

    image_size_px: int
    attn_loss_downscale: int
    vae_steps: int | None
    unet_steps: int | None
    heldout_combos: tuple[tuple[str, str, str], ...]
    gate: dict[str, bool] = field(default_factory=dict)
    gate_passed: bool = False
    evaluation: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def capability_note(self) -> str:
        """One line on what these weights can and cannot do, for the demo and the README."""
        steps = f"VAE {self.vae_steps or 0} steps, UNet {self.unet_steps or 0} steps"
        if not self.gate:
            return (f"These toy weights have not been measured against their gate yet ({steps}): "
                    "expect the pipeline to run end to end, not subjects drawn or posed reliably.")
        figures = f"{steps}; {self._figures()}"
        if self.gate_passed:
            return (f"These toy weights passed their gate ({figures}): samples should show the asked "
                    "background and kinds.")
        failed = ", ".join(k for k, ok in self.gate.items() if not ok) or "not every criterion was measured"
        return (f"These toy weights have not passed their gate ({figures}; failing: {failed}): they "
                "run the whole pipeline but cannot yet be trusted to draw the asked background, kinds "
                "or poses.")

    def _figures(self) -> str:
        ev = self.evaluation

        def share(key: str) -> str:
            return f"{ev[key]:.0%}" if isinstance(ev.get(key), (int, float)) else "?"

        psnr = f"{ev['psnr_db']:.1f} dB" if isinstance(ev.get("psnr_db"), (int, float)) else "? dB"
        return f"background right {share('background_acc')}, kind right {share('kind_acc')}, VAE {psnr}"


def read_toy_info(folder: Path) -> ToyInfo | None:
    """Parse ``folder/toyworld.json``; None when the folder has none.

    Raises:
        UserError: the file exists but is not the JSON ``tools/train_toy_base.py`` writes.
    """
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        gate = {str(k): bool(v) for k, v in data.get("gate", {}).items()}
        return ToyInfo(
            image_size_px=int(data.get("image_size_px", DEFAULT_IMAGE_SIZE_PX)),
            attn_loss_downscale=int(data.get("attn_loss_downscale", 0)),
            vae_steps=data.get("vae_step"), unet_steps=data.get("unet_step"),
            heldout_combos=tuple(tuple(c) for c in data.get("heldout_combos", ())),
            gate=gate, gate_passed=bool(data.get("gate_passed", False)) and bool(gate) and all(gate.values()),
            evaluation=dict(data.get("evaluation", {})), raw=data,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not a toy model description ({exc}); re-export the model with "
                        "tools/train_toy_base.py --stage export.") from exc


def require_toy_model() -> Path:
    """The bundled toy model's folder.

    Raises:
        UserError: the weights are not bundled in this install.
    """
    folder = toy_model_dir()
    if not (folder / "model_index.json").is_file():
        raise UserError(f"The toy base model is not bundled in this install (no model in {folder}): "
                        "reinstall lowmcgm from a release that ships it, or train one with "
                        "tools/train_toy_base.py and pass its model folder to --base-model (--base-model "
                        "tiny, random weights, checks the plumbing).")
    return folder


def load_toy_info() -> ToyInfo | None:
    """The bundled toy model's ``toyworld.json``, or None when the model is not bundled."""
    return read_toy_info(toy_model_dir())


def load_toy_base() -> BaseModel:
    """Load the bundled toy model as fp32 (``--base-model toy``).

    The weights are stored in fp16 to keep the package small; every part is upcast because fp16
    compute on a CPU is about 100x slower than fp32, and the trainer casts frozen weights back to
    half precision itself where mixed precision is on.

    Raises:
        UserError: the weights are not bundled in this install.
    """
    folder = require_toy_model()
    check_folder_layout(folder)
    base = load_folder(folder, TOY_NAME)
    for module in (base.text_encoder, base.vae, base.unet):
        module.float()  # not .to(): diffusers warns about every .to() cast of a loaded model
    return base
