"""What the page keeps between clicks (``PageState``: the training job, the loaded base model), and
how every tab shows a message: the CLI's one line for a ``UserError``, verbatim in a Markdown box."""

from __future__ import annotations

import dataclasses
import html
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lowmcgm.errors import UserError
from lowmcgm.ui.jobs import JobSlot

# Subject slots on the page: canvases for subjects, and for poses on the Sample tab.
MAX_SUBJECTS = 4


@dataclasses.dataclass
class PageState:
    """What the page keeps between clicks."""

    root: Path
    # The base models the page offers (``lowmcgm ui --base-model``, repeatable): the only model
    # paths it reads, so a browser can neither open nor probe other server folders.
    base_models: tuple[str, ...] = ("toy",)
    jobs: JobSlot = dataclasses.field(default_factory=JobSlot)
    # (base model name, (UNet, text encoders) stored in fp8, the artifact's path for a full-mode one,
    # else "") -> the one loaded BaseModel (``base_for``)
    bases: dict[tuple[str, tuple[bool, bool], str], Any] = dataclasses.field(default_factory=dict)
    sampling: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def check_base_model(self, name: str) -> str:
        """``name`` if the page offers it; otherwise say how to offer it."""
        if name not in self.base_models:
            raise UserError(f"Base model '{name}' is not one this page offers ({', '.join(self.base_models)}): "
                            f"start the page with --base-model {name} to offer it.")
        return name

    def base_model_of(self, artifact: Any, chosen: str) -> str:
        """The base model to sample ``artifact`` on: ``chosen``, else the one it was trained on, if offered."""
        from lowmcgm.sampling.sampler import recorded_base_model

        if chosen:
            return self.check_base_model(chosen)
        recorded, _ = recorded_base_model(artifact)
        if recorded in self.base_models:
            return recorded
        raise UserError(f"This artifact was trained on base model '{recorded}', which this page does not offer: "
                        f"pick one under 'Base model', or start the page with --base-model {recorded}.")

    def base_for(self, artifact_path: Path, artifact: Any, chosen: str):
        """The base model to sample ``artifact`` on (``base_model_of``), loaded once per page.

        Sampling hands the base back without the artifact's state (``sampler.sample_artifact``), so
        the next sample, of this artifact or another, installs on it cleanly. Two things stay on it
        for good: a UNet (text encoders) stored in fp8 for an artifact trained with ``model.fp8_base``
        (``model.fp8_text_encoders``; ``sampler.build_sampler``), and the whole weights of a ``full``-mode artifact
        (``MCGMState.remove``): such an artifact keeps a base of its own.
        """
        from lowmcgm.sampling.sampler import load_base_for, trained_with_fp8

        name = self.base_model_of(artifact, chosen)
        full = (artifact.meta.get("lora") or {}).get("mode") == "full"
        key = (name, trained_with_fp8(artifact), str(artifact_path) if full else "")
        if key not in self.bases:
            self.bases.clear()  # one base in memory at a time
            # "" loads the recorded base as training read it (a single file with its shipped config).
            self.bases[key] = load_base_for(artifact, chosen)
        return self.bases[key]


def error_text(exc: UserError, uploads: Iterable[str | None] = ()) -> str:
    """The CLI's line for ``exc``, as the page shows it (see ``shown``).

    ``uploads``: the files of the action, as gradio hands them over: its copies under
    ``<root>/.gradio-cache/<hash>/``. Each is named as the user knows it, by its own file name
    (the copy's last path part), not by a path the user never saw.
    """
    text = " ".join(str(exc).splitlines())
    for path in sorted({str(p) for p in uploads if p}, key=len, reverse=True):  # a longer path first
        text = text.replace(path, Path(path).name)
    return shown("error: " + text)


def shown(text: str) -> str:
    """``text`` for a Markdown box, verbatim: handles such as <asset0> would otherwise be taken for
    HTML tags and vanish."""
    return html.escape(text, quote=False)


def photo_array(path: str) -> np.ndarray:
    from lowmcgm.data import load_image

    return np.asarray(load_image(path))
