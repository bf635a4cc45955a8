"""Exporting an artifact to the formats other Stable Diffusion tools load, and importing their LoRAs.

Three exports, each a plain safetensors file set that the tool loads without conversion scripts:

- ``kohya``: the LoRA as A1111/ComfyUI/kohya read it (``lora_unet_*``, ``lora_te_text_model_*``,
  ``.lora_down``/``.lora_up``/``.alpha``, ``ss_*`` and ``modelspec.*`` metadata), optionally with
  the handles bundled as ``bundle_emb.<handle>.string_to_param.*``.
- ``embeddings``: one A1111-layout textual-inversion file per handle.
- ``diffusers``: ``pytorch_lora_weights.safetensors`` written by diffusers' own
  ``save_lora_weights`` with the adapter metadata (alpha), plus ``learned_embeds.safetensors``.

The mask encoder has no counterpart in those tools and is never exported (``MASK_ENCODER_NOTE``).
The reverse direction, ``load_init_lora``, starts phase 2 from a kohya or diffusers LoRA file.
Formats and traps are collected in ``shared/INTEROP.md``; we write kohya keys ourselves because
diffusers' ``convert_state_dict_to_kohya`` stores alpha = rank and names text-encoder keys
``lora_te1_encoder_layers_*`` under transformers >= 5.10, which A1111 does not match.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lowmcgm import __version__
from lowmcgm.adapters import ADAPTER_NAME, load_lora_state_dict
from lowmcgm.artifact import SAVE_DTYPES, Artifact, atomic_save, load_artifact, read_header
from lowmcgm.errors import UserError

FORMATS = ("kohya", "embeddings", "diffusers")
MASK_ENCODER_NOTE = ("Not exported: the mask encoder, which has no counterpart in A1111, ComfyUI or diffusers; "
                     "pose control by masks is lost, the subjects are kept and answer to their handles in "
                     "plain prompts.")
KOHYA_UNET_PREFIX = "lora_unet_"
# kohya, A1111 and ComfyUI name SD 1.x/2.x text-encoder modules after the transformers layout that
# still had the ``text_model`` wrapper, whatever transformers version wrote the weights.
KOHYA_TE_PREFIX = "lora_te_text_model_"
BUNDLE_PREFIX = "bundle_emb."
A1111_EMBEDDING_KEY = "string_to_param.*"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_EMBEDS_NAME = "learned_embeds.safetensors"  # what diffusers' textual-inversion script writes
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# kohya's ss_base_model_version -> (ss_v2, modelspec.architecture, modelspec.prediction_type); the
# architecture strings are those of kohya's sai_model_spec for SD 1.x/2.x LoRA.
_VERSIONS = {
    "sd_v1": (False, "stable-diffusion-v1/lora", "epsilon"),
    "sd_v2": (True, "stable-diffusion-v2-512/lora", "epsilon"),
    "sd_v2_v": (True, "stable-diffusion-v2-768-v/lora", "v"),
}
# Module names lowmcgm targets by default; used to turn a file's modules into --set advice.
_UNET_TARGET_NAMES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
_TE_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_OTHER_ADAPTERS = ("dora_scale", "hada_", "lokr_", "lora_mid", "oft_", "lora_magnitude_vector")


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    """What ``export_artifact`` wrote."""

    files: list[Path]
    handles: list[str]


def export_artifact(artifact_path: Path, fmt: str, out: Path, bundle_embeddings: bool = True,
                    dtype: str = "fp16") -> ExportResult:
    """Export a lowmcgm artifact for other tools.

    Args:
        artifact_path: the artifact written by ``lowmcgm train``.
        fmt: ``kohya`` (``out`` is a ``.safetensors`` file), ``embeddings`` or ``diffusers``
            (``out`` is a folder, created if missing).
        out: where to write.
        bundle_embeddings: kohya only: also store the handles as ``bundle_emb.*`` (A1111 loads
            them with the LoRA; diffusers' ``load_lora_weights`` refuses such files).
        dtype: ``fp16``, ``bf16`` or ``fp32`` for the LoRA weights (alphas and embeddings stay fp32).

    Returns:
        The files written (each under a temporary name first, then renamed) and the handles.

    Raises:
        UserError: unknown format or dtype, bad output path, or an artifact without LoRA
            (phase 2 skipped or ``full`` mode) for ``kohya``/``diffusers``.
    """
    if fmt not in FORMATS:
        raise UserError(f"Unknown export format '{fmt}': use one of {', '.join(FORMATS)}.")
    if dtype not in SAVE_DTYPES:
        raise UserError(f"Unknown export dtype '{dtype}': use one of {', '.join(SAVE_DTYPES)}.")
    artifact = load_artifact(Path(artifact_path))
    out = Path(out).expanduser()
    if fmt == "kohya":
        files = [export_kohya(artifact, out, bundle_embeddings=bundle_embeddings, dtype=dtype)]
    elif fmt == "embeddings":
        files = export_embeddings(artifact, out)
    else:
        files = export_diffusers(artifact, out, dtype=dtype)
    return ExportResult(files, list(artifact.handles))


def export_kohya(artifact: Artifact, out: Path, bundle_embeddings: bool = True, dtype: str = "fp16") -> Path:
    """Write the LoRA as one kohya/A1111/ComfyUI ``.safetensors`` file; see ``export_artifact``."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must name a .safetensors file for the kohya format "
                        "(e.g. --out mylora.safetensors).")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; the kohya format writes one file: name it, "
                        f"e.g. --out {out / 'lora.safetensors'}.")
    tensors = build_kohya_state_dict(artifact, dtype)
    if bundle_embeddings:
        for handle, vector in zip(artifact.handles, artifact.handle_vectors):
            tensors[f"{BUNDLE_PREFIX}{handle}.{A1111_EMBEDDING_KEY}"] = vector.float()[None]  # (1, d)
    metadata = build_kohya_metadata(artifact, out.stem)
    _prepare_folder(out.parent)  # only now: a refused export leaves no folder behind
    atomic_save(tensors, metadata, out)
    return out


def build_kohya_state_dict(artifact: Artifact, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """The artifact's LoRA under kohya names: ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

    PEFT's ``lora_A`` is kohya's ``lora_down`` ((r, in) or (r, in, 1, 1) for 1x1 convs) and
    ``lora_B`` is ``lora_up``; both scale by alpha / r, so the weights carry over unchanged and
    ``.alpha`` is the trained alpha, stored as an fp32 scalar.
    """
    rank, alpha = _lora_rank_alpha(artifact)
    cast = SAVE_DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    parts = ((artifact.unet_lora, KOHYA_UNET_PREFIX), (artifact.text_encoder_lora, KOHYA_TE_PREFIX))
    for state, prefix in parts:
        for path, (down, up) in _peft_modules(state, rank).items():
            name = prefix + _strip_text_model(path).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down.to(cast)
            tensors[f"{name}.lora_up.weight"] = up.to(cast)
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def build_kohya_metadata(artifact: Artifact, output_name: str) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` strings A1111, ComfyUI and kohya read (see INTEROP.md)."""
    rank, alpha = _lora_rank_alpha(artifact)
    version = str(artifact.meta.get("base_model_version", ""))
    if version not in _VERSIONS:
        raise UserError(f"The artifact does not say which Stable Diffusion version it was trained on "
                        f"(base_model_version '{version}'); retrain it with this lowmcgm.")
    is_v2, architecture, prediction = _VERSIONS[version]
    resolution = int(artifact.meta.get("resolution", 512))
    return {
        "ss_v2": str(is_v2),
        "ss_base_model_version": version,
        "ss_v_parameterization": str(prediction == "v"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({}),  # plain LoRA: none of kohya's conv_dim/dropout arguments
        "ss_network_train_unet_only": str(not artifact.text_encoder_lora),
        "ss_output_name": output_name,
        "ss_resolution": str((resolution, resolution)),  # kohya writes the tuple's repr
        "ss_sd_model_name": str(artifact.meta.get("base_model", "")),
        "ss_training_comment": f"lowmcgm {__version__}; handles {', '.join(artifact.handles)}",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": ", ".join(artifact.handles),
        "modelspec.prediction_type": prediction,
        "modelspec.description": "Trained with lowmcgm (MCGM); the mask encoder is not included.",
        "lowmcgm_version": __version__,
        "lowmcgm_handles": json.dumps(artifact.handles),
    }


def embedding_file_stem(handle: str) -> str:
    """The file name (and so the A1111/ComfyUI trigger word) of a handle: ``<asset0>`` -> ``asset0``.

    ``<`` and ``>`` are not allowed in Windows file names; handles are otherwise letters, digits,
    ``_`` and ``-`` (``lowmcgm.handles.HANDLE_PATTERN``).
    """
    return handle.strip("<>")


def export_embeddings(artifact: Artifact, out_dir: Path) -> list[Path]:
    """One A1111-layout ``<stem>.safetensors`` per handle (``string_to_param.*``: (1, d) fp32).

    A1111 and ComfyUI use the file name as the trigger word (``asset0``, ComfyUI
    ``embedding:asset0``); diffusers loads it with ``load_textual_inversion(file, token="<asset0>")``.
    """
    out_dir = Path(out_dir)
    paths = [out_dir / f"{embedding_file_stem(handle)}.safetensors" for handle in artifact.handles]
    for handle, path in zip(artifact.handles, paths):
        if path.parent != out_dir:  # a handle is data, never a path: no separators, no ".."
            raise UserError(f"Handle {handle!r} cannot be a file name; handles are <name> with letters, "
                            "digits, _ or -.")
    _prepare_folder(out_dir)
    for handle, vector, path in zip(artifact.handles, artifact.handle_vectors, paths):
        atomic_save({A1111_EMBEDDING_KEY: vector.float()[None]},
                    {"name": embedding_file_stem(handle), "lowmcgm_handle": handle, "lowmcgm_version": __version__},
                    path)
    return paths


def export_diffusers(artifact: Artifact, out_dir: Path, dtype: str = "fp16") -> list[Path]:
    """``pytorch_lora_weights.safetensors`` (diffusers' own writer, with alpha) and ``learned_embeds.safetensors``.

    Text-encoder keys keep the ``text_model.`` level: diffusers strips it for transformers
    versions without the wrapper and needs it for older ones, so one file serves both.
    """
    from diffusers import StableDiffusionPipeline

    rank, alpha = _lora_rank_alpha(artifact)
    out_dir = Path(out_dir)
    _prepare_folder(out_dir)
    cast = SAVE_DTYPES[dtype]
    layers: dict[str, Any] = {}
    for component, state in (("unet", artifact.unet_lora), ("text_encoder", artifact.text_encoder_lora)):
        modules = _peft_modules(state, rank)
        if not modules:
            continue
        weights = {}
        for path, (down, up) in modules.items():
            key = f"text_model.{_strip_text_model(path)}" if component == "text_encoder" else path
            weights[f"{key}.lora_A.weight"] = down.to(cast).contiguous()
            weights[f"{key}.lora_B.weight"] = up.to(cast).contiguous()
        # Exact module paths (without text_model.): PEFT matches a target when a module's name
        # equals it or ends with "." + it, which covers both CLIPTextModel layouts.
        targets = sorted(_strip_text_model(p) for p in modules)
        layers[f"{component}_lora_layers"] = weights
        layers[f"{component}_lora_adapter_metadata"] = {
            "r": rank, "lora_alpha": float(alpha), "target_modules": targets, "lora_dropout": 0.0,
            "bias": "none", "init_lora_weights": True,
        }
    lora_path = out_dir / DIFFUSERS_LORA_NAME
    tmp_name = f".{DIFFUSERS_LORA_NAME}.tmp-{os.getpid()}"
    try:
        StableDiffusionPipeline.save_lora_weights(out_dir, weight_name=tmp_name, **layers)
        _publish(out_dir / tmp_name, lora_path)
    finally:
        (out_dir / tmp_name).unlink(missing_ok=True)
    embeds_path = out_dir / DIFFUSERS_EMBEDS_NAME
    atomic_save({h: v.float() for h, v in zip(artifact.handles, artifact.handle_vectors)},
                {"lowmcgm_version": __version__}, embeds_path)
    return [lora_path, embeds_path]


def _lora_rank_alpha(artifact: Artifact) -> tuple[int, float]:
    lora = artifact.meta.get("lora") or {}
    if lora.get("mode") == "full":
        raise UserError("This artifact fine-tuned all UNet weights (lora.phase2_mode=full): it has no LoRA to "
                        "export; export --format embeddings still works, or retrain with phase2_mode=lora.")
    if not artifact.unet_lora and not artifact.text_encoder_lora:
        raise UserError("This artifact has no LoRA (trained with train.phase2_steps=0): only "
                        "--format embeddings applies.")
    return int(lora["rank"]), float(lora["alpha"])


def _peft_modules(state: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT ``<path>.lora_A.weight``/``lora_B.weight`` pairs -> {path: (down, up)}."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted(state):
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight"):
            raise UserError(f"The artifact holds a LoRA tensor no other tool reads ({key}).")
        path = key[: -len(".lora_A.weight")]
        up = state.get(f"{path}.lora_B.weight")
        if up is None:
            raise UserError(f"The artifact's LoRA is incomplete: {path} has no lora_B weight.")
        modules[path] = (state[key], up)
    if len(state) != 2 * len(modules):
        raise UserError("The artifact's LoRA is incomplete: some lora_B weights have no lora_A.")
    if any(down.shape[0] != rank for down, _ in modules.values()):
        raise UserError(f"The artifact's LoRA tensors do not match its rank {rank}.")
    return modules


def _strip_text_model(path: str) -> str:
    return path.removeprefix("text_model.")


def _prepare_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"Output path {folder} exists and is not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the output folder {folder} ({exc.strerror}); choose another --out.") from exc
    if not os.access(folder, os.W_OK):
        raise UserError(f"Output folder {folder} is not writable; choose another --out.")


def _publish(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``path`` (readable like any new file)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Import: read a kohya or diffusers LoRA, summarise it, load it as phase 2's starting point
# ----------------------------------------------------------------------------------------------

@dataclass
class LoraModule:
    """One adapted module of a LoRA file."""

    down: torch.Tensor  # (r, in) or (r, in, 1, 1); PEFT's lora_A
    up: torch.Tensor  # (out, r) or (out, r, 1, 1); PEFT's lora_B
    alpha: float | None  # None: the file stores none, the format's convention says alpha = r

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None or self.alpha == 0 else self.alpha


@dataclass
class LoraFile:
    """A kohya or diffusers LoRA file, read but not yet matched to a model.

    Module names are kohya names (``lora_unet_...``, text encoder normalised to
    ``lora_te_text_model_...``) for kohya files and module paths otherwise; only a model
    resolves kohya names, since ``_`` in them may stand for ``.`` or ``_``.
    """

    path: Path
    format: str  # "kohya", "diffusers" or "lowmcgm" (an artifact)
    unet: dict[str, LoraModule]
    text_encoder: dict[str, LoraModule]
    metadata: dict[str, str]
    embeddings: list[str] = field(default_factory=list)  # bundled handle names (kohya)

    @property
    def modules(self) -> list[LoraModule]:
        return list(self.unet.values()) + list(self.text_encoder.values())

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.effective_alpha for m in self.modules})

    @property
    def alpha_stored(self) -> bool:
        return all(m.alpha is not None for m in self.modules)


def read_lora_file(path: Path) -> LoraFile:
    """Read a kohya or diffusers LoRA, or a lowmcgm artifact's (``.safetensors`` only: nothing is unpickled).

    Args:
        path: a ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``.

    Raises:
        UserError: missing or damaged file, another format (LyCORIS, SDXL, older diffusers), or
            mismatched down/up shapes.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_LORA_NAME
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA file {path} is not a .safetensors file; lowmcgm never unpickles weights: "
                        "convert it to .safetensors first.")
    header, metadata = read_header(path)
    if metadata.get("format") == "lowmcgm":
        return _read_lowmcgm(path)
    other = next((k for k in header if any(tag in k for tag in _OTHER_ADAPTERS)), None)
    if other:
        raise UserError(f"{path} is not a plain LoRA (it has {other}: DoRA or a LyCORIS type); only plain "
                        "kohya or diffusers LoRA files can start training.")
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in header):
        raise UserError(f"{path} is an SDXL LoRA (it has a second text encoder); lowmcgm trains SD 1.x/2.x.")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in header):
        lora = _read_kohya(path, header, metadata)
    elif any(k.startswith(("unet.", "text_encoder.")) and ".lora_A." in k for k in header):
        lora = _read_diffusers(path, header, metadata)
    elif header and (set(header) <= {A1111_EMBEDDING_KEY, "emb_params"} or all(k.startswith("<") for k in header)):
        raise UserError(f"{path} looks like a textual-inversion embedding, not a LoRA; only LoRA files can "
                        "start phase 2.")
    else:
        raise UserError(f"{path} is neither a kohya LoRA (lora_unet_* keys) nor a diffusers LoRA "
                        "(unet.*.lora_A.weight keys).")
    if not lora.modules:
        raise UserError(f"{path} holds no LoRA weights.")
    for name, module in {**lora.unet, **lora.text_encoder}.items():
        if (module.down.dim() not in (2, 4) or module.down.dim() != module.up.dim()
                or module.up.shape[1] != module.down.shape[0]):
            raise UserError(f"{path} is damaged: the down and up weights of {name} do not fit together "
                            f"({list(module.down.shape)} and {list(module.up.shape)}).")
    return lora


def _read_kohya(path: Path, header: dict[str, Any], metadata: dict[str, str]) -> LoraFile:
    tensors = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    embeddings = []
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name = key[len(BUNDLE_PREFIX):].split(".", 1)[0]
            if name not in embeddings:
                embeddings.append(name)
            continue
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(("lora_unet_", "lora_te_", "lora_te1_")):
            raise UserError(f"{path} has a tensor a kohya LoRA does not ({key}).")
        groups.setdefault(key[: -len(suffix)], {})[suffix] = value
    unet, text_encoder = {}, {}
    for name, parts in groups.items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise UserError(f"{path} is incomplete: {name} lacks its lora_down or lora_up weight.")
        alpha = parts.get(".alpha")
        if alpha is not None and (alpha.numel() != 1 or not math.isfinite(float(alpha.float().item()))):
            raise UserError(f"{path} is damaged: the alpha of {name} is not one finite number.")
        module = LoraModule(parts[".lora_down.weight"].float(), parts[".lora_up.weight"].float(),
                            float(alpha.float().item()) if alpha is not None else None)
        if name.startswith(KOHYA_UNET_PREFIX):
            unet[name] = module
        else:
            text_encoder[_normalise_kohya_te_name(name)] = module
    return LoraFile(path, "kohya", unet, text_encoder, metadata, embeddings)


def _read_lowmcgm(path: Path) -> LoraFile:
    """A lowmcgm artifact's LoRA (a later run may start from an earlier run's)."""
    artifact = load_artifact(path)
    lora = artifact.meta.get("lora") or {}
    if lora.get("mode") != "lora" or not artifact.unet_lora:
        raise UserError(f"{path} is a lowmcgm artifact without LoRA (phase2_mode=full or phase2_steps=0).")
    alpha = float(lora["alpha"])
    parts = []
    for state in (artifact.unet_lora, artifact.text_encoder_lora):
        modules = _peft_modules(state, int(lora["rank"]))
        parts.append({_strip_text_model(p): LoraModule(down, up, alpha) for p, (down, up) in modules.items()})
    version = str(artifact.meta.get("base_model_version", ""))
    return LoraFile(path, "lowmcgm", parts[0], parts[1], {"base_model_version": version})


def _normalise_kohya_te_name(name: str) -> str:
    """``lora_te1_*`` and names without ``text_model_`` (diffusers' converter) -> ``lora_te_text_model_*``."""
    rest = name.removeprefix("lora_te1_") if name.startswith("lora_te1_") else name.removeprefix("lora_te_")
    return KOHYA_TE_PREFIX + rest.removeprefix("text_model_")


def _read_diffusers(path: Path, header: dict[str, Any], metadata: dict[str, str]) -> LoraFile:
    try:
        config = json.loads(metadata[DIFFUSERS_METADATA_KEY]) if DIFFUSERS_METADATA_KEY in metadata else {}
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} has unreadable LoRA adapter metadata.") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path} has unreadable LoRA adapter metadata (not a table).")
    tensors = load_file(str(path))
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {"unet": {}, "text_encoder": {}}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if component not in parts or match is None:
            raise UserError(f"{path} has a tensor a diffusers LoRA of lora_A/lora_B weights does not ({key}); "
                            "re-save it with a current diffusers.")
        module_path = _strip_text_model(match.group(1)) if component == "text_encoder" else match.group(1)
        parts[component].setdefault(module_path, {})[match.group(2)] = value
    result: dict[str, dict[str, LoraModule]] = {}
    for component, modules in parts.items():
        if config.get(f"{component}.rank_pattern") or config.get(f"{component}.alpha_pattern"):
            raise UserError(f"{path} uses different ranks or alphas per module; lowmcgm trains one rank "
                            "and one alpha.")
        alpha = config.get(f"{component}.lora_alpha")
        if alpha is not None and (type(alpha) not in (int, float) or not math.isfinite(alpha)):
            raise UserError(f"{path} has a {component} lora_alpha that is not a number ({alpha!r}).")
        result[component] = {}
        for module_path, pair in modules.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise UserError(f"{path} is incomplete: {module_path} lacks its lora_A or lora_B weight.")
            result[component][module_path] = LoraModule(pair["lora_A"].float(), pair["lora_B"].float(),
                                                        float(alpha) if alpha is not None else None)
    return LoraFile(path, "diffusers", result["unet"], result["text_encoder"], metadata)


@dataclass
class LoraSummary:
    """What ``lowmcgm import-lora`` reports about a LoRA file."""

    path: str
    format: str
    ranks: list[int]
    alphas: list[float]
    alpha_stored: bool
    unet_modules: int
    text_encoder_modules: int
    base: str
    unet_targets: list[str]
    text_encoder_targets: list[str]
    embeddings: list[str]
    settings: list[str]  # the --set items that train from this file, empty when it cannot

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize_lora(path: Path) -> LoraSummary:
    """Read ``path`` and say what it is and which settings train from it."""
    lora = read_lora_file(path)
    unet_targets = _target_names(lora.unet, _UNET_TARGET_NAMES, lora.format)
    te_targets = _target_names(lora.text_encoder, _TE_TARGET_NAMES, lora.format)
    settings: list[str] = []
    if len(lora.ranks) == 1 and len(lora.alphas) == 1:
        settings = [f"lora.init_lora={lora.path}", f"lora.rank={lora.ranks[0]}", f"lora.alpha={lora.alphas[0]:g}"]
        if lora.text_encoder:
            settings.append("lora.use_text_encoder_lora=true")
        if not set(unet_targets) <= set(_UNET_TARGET_NAMES):
            settings.append("lora.unet_targets=" + ",".join(unet_targets))
        if not set(te_targets) <= set(_TE_TARGET_NAMES):
            settings.append("lora.text_encoder_targets=" + ",".join(te_targets))
    return LoraSummary(
        path=str(lora.path), format=lora.format, ranks=lora.ranks, alphas=lora.alphas,
        alpha_stored=lora.alpha_stored, unet_modules=len(lora.unet), text_encoder_modules=len(lora.text_encoder),
        base=_describe_base(lora), unet_targets=unet_targets, text_encoder_targets=te_targets,
        embeddings=lora.embeddings, settings=settings,
    )


def _target_names(modules: dict[str, LoraModule], known: tuple[str, ...], fmt: str) -> list[str]:
    """The config target names a file's modules correspond to (``to_out.0``), unknown ones verbatim."""
    names = set()
    for name in modules:
        # kohya names use _ for every dot, so compare in that spelling.
        spelled = name if fmt == "kohya" else name.replace(".", "_")
        hit = next((t for t in known if spelled.endswith("_" + t.replace(".", "_"))), None)
        names.add(hit or (name if fmt == "kohya" else name.rsplit(".", 1)[-1]))
    return sorted(names, key=lambda t: (t not in known, known.index(t) if t in known else 0, t))


def _describe_base(lora: LoraFile) -> str:
    version = lora.metadata.get("ss_base_model_version") or lora.metadata.get("base_model_version")
    if version:
        return f"{version} (from the file's metadata)"
    widths = {m.down.shape[1] for n, m in lora.unet.items() if "attn2" in n and n.replace(".", "_").endswith("to_k")}
    if len(widths) == 1:
        width = widths.pop()
        guess = {768: "sd_v1", 1024: "sd_v2 or sd_v2_v"}.get(width, "unknown")
        return f"{guess} (cross-attention width {width})"
    return "unknown (no metadata, no cross-attention layer to measure)"


def check_init_lora(path: Path, lora_cfg: Any) -> LoraFile:
    """Refuse, before any weights load, a LoRA file whose rank, alpha or parts the config cannot hold.

    Args:
        path: ``lora.init_lora``.
        lora_cfg: the run's ``LoraConfig`` (rank, alpha, use_text_encoder_lora).

    Returns:
        The file, read.
    """
    lora = read_lora_file(path)
    if len(lora.ranks) > 1 or len(lora.alphas) > 1:
        raise UserError(f"{lora.path} mixes ranks {lora.ranks} or alphas {lora.alphas}; lowmcgm trains one "
                        "rank and one alpha, so it cannot start from this file.")
    problems = []
    if lora.ranks[0] != lora_cfg.rank:
        problems.append(f"rank {lora.ranks[0]} (set --set lora.rank={lora.ranks[0]})")
    if not math.isclose(lora.alphas[0], lora_cfg.alpha, rel_tol=1e-3):
        problems.append(f"alpha {lora.alphas[0]:g} (set --set lora.alpha={lora.alphas[0]:g})")
    if lora.text_encoder and not lora_cfg.use_text_encoder_lora:
        problems.append("a text-encoder LoRA (set --set lora.use_text_encoder_lora=true)")
    if problems:
        raise UserError(f"lora.init_lora {lora.path} has {' and '.join(problems)}; 'lowmcgm import-lora "
                        f"{lora.path}' prints all the settings it needs.")
    return lora


def load_init_lora(setup: Any, path: Path) -> None:
    """Copy a kohya or diffusers LoRA into the PEFT LoRA that the trainer injected for phase 2.

    Modules of the run's LoRA that the file lacks keep their fresh initialisation (zero up
    weights: no change to the model).

    Args:
        setup: the trainer's ``Setup`` (reads ``cfg.lora``, ``base.unet``, ``base.text_encoder``),
            after ``add_lora`` ran on the UNet (and the text encoder when configured).
        path: ``lora.init_lora``.

    Raises:
        UserError: the rank, alpha, targets or shapes do not match the configured LoRA; the message
            names the setting to change.
    """
    lora = check_init_lora(path, setup.cfg.lora)
    load_lora_file_into(lora, setup.base.unet, setup.base.text_encoder if lora.text_encoder else None)


def _matched_modules(lora: LoraFile, unet: nn.Module, text_encoder: nn.Module | None):
    """Yield ``(component, module in the file, module path in the model, model layer, state key)``.

    A module of the file that the model lacks is refused: the file was made for another model.
    """
    parts = [("unet", lora.unet, unet, KOHYA_UNET_PREFIX)]
    if text_encoder is not None:
        parts.append(("text_encoder", lora.text_encoder, text_encoder, KOHYA_TE_PREFIX))
    for component, modules, model, prefix in parts:
        by_name = _module_names(model, prefix if lora.format == "kohya" else "")
        for name, module in modules.items():
            found = by_name.get(name)
            if found is None:
                raise UserError(f"{lora.path} was made for another model: this {component} has no module "
                                f"{name}; use a LoRA for the same base model.")
            yield component, module, found[0], found[1]


def load_lora_file_into(lora: LoraFile, unet: nn.Module, text_encoder: nn.Module | None) -> None:
    """Match ``lora``'s modules to the models' injected LoRA layers and copy the weights in."""
    states: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for component, module, module_path, layer in _matched_modules(lora, unet, text_encoder):
        if not _has_adapter(layer):
            target_key = "lora.unet_targets" if component == "unet" else "lora.text_encoder_targets"
            raise UserError(f"{lora.path} adapts {module_path}, which this run's LoRA does not target: "
                            f"add it with --set {target_key}=...,{_config_name(module_path)}.")
        want = tuple(layer.lora_A[ADAPTER_NAME].weight.shape), tuple(layer.lora_B[ADAPTER_NAME].weight.shape)
        have = tuple(module.down.shape), tuple(module.up.shape)
        if want != have:
            raise UserError(f"{lora.path} was made for another base model: {module_path} has LoRA shapes "
                            f"{list(have[0])}/{list(have[1])}, this model needs {list(want[0])}/{list(want[1])}.")
        states[component][f"{module_path}.lora_A.weight"] = module.down
        states[component][f"{module_path}.lora_B.weight"] = module.up
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if states[component]:
            load_lora_state_dict(model, states[component])


def check_lora_fits(lora: LoraFile, unet: nn.Module, text_encoder: nn.Module | None) -> None:
    """Refuse a LoRA whose modules this base model lacks or has in other sizes, before any step.

    ``load_lora_file_into`` finds the same problems, but only when phase 2 begins.
    """
    for _, module, module_path, layer in _matched_modules(lora, unet, text_encoder):
        weight = getattr(layer, "weight", None)  # (out, in) or (out, in, kh, kw)
        if not isinstance(weight, torch.Tensor) or weight.dim() != module.down.dim():
            raise UserError(f"{lora.path} was made for another base model: {module_path} is not the "
                            "kind of layer its LoRA adapts.")
        if (module.down.shape[1], module.up.shape[0]) != (weight.shape[1], weight.shape[0]):
            raise UserError(f"{lora.path} was made for another base model: {module_path} maps "
                            f"{weight.shape[1]} to {weight.shape[0]} values here, its LoRA "
                            f"{module.down.shape[1]} to {module.up.shape[0]}.")


def _module_names(model: nn.Module, kohya_prefix: str) -> dict[str, tuple[str, nn.Module]]:
    """A model's modules by the names a LoRA file uses: kohya names, or paths without ``text_model.``."""
    names = {}
    for module_path, module in model.named_modules():
        if not module_path or ".lora_" in module_path or ".base_layer" in module_path:
            continue  # PEFT's own children of an adapted layer
        plain = _strip_text_model(module_path)
        names[kohya_prefix + plain.replace(".", "_") if kohya_prefix else plain] = (module_path, module)
    return names


def _has_adapter(module: nn.Module) -> bool:
    lora_a = getattr(module, "lora_A", None)
    return isinstance(lora_a, nn.ModuleDict) and ADAPTER_NAME in lora_a


def _config_name(module_path: str) -> str:
    known = _UNET_TARGET_NAMES + _TE_TARGET_NAMES
    hit = next((t for t in known if module_path.endswith("." + t)), None)
    if hit:
        return hit
    head, _, last = module_path.rpartition(".")
    # Sequential children are numbered (to_out.0): a bare number would match every module.
    return f"{head.rpartition('.')[2]}.{last}" if last.isdigit() else last
