"""Exporting an artifact to the formats other Stable Diffusion tools load.

Three exports, each a plain safetensors file set that the tool loads without conversion scripts:

- ``kohya``: the LoRA as A1111/ComfyUI/kohya read it (``lora_unet_*``, ``lora_te_text_model_*``,
  ``.lora_down``/``.lora_up``/``.alpha``, ``ss_*`` and ``modelspec.*`` metadata), optionally with
  the handles bundled as ``bundle_emb.<handle>.string_to_param.*``.
- ``embeddings``: one A1111-layout textual-inversion file per handle.
- ``diffusers``: ``pytorch_lora_weights.safetensors`` written by diffusers' own
  ``save_lora_weights`` with the adapter metadata (alpha), plus ``learned_embeds.safetensors``.

SDXL artifacts export to the same three, in SDXL's layouts: kohya's UNet names are those of the
SGM UNet (``lora_unet_input_blocks_4_1_...``, ``sdxl_names``) and its text-encoder names
``lora_te1_text_model_*``; an embedding holds one row per text encoder, ``clip_l`` (1, d1) and
``clip_g`` (1, d2), bundled as ``bundle_emb.<handle>.clip_l`` / ``.clip_g``; the diffusers
folder's ``learned_embeds.safetensors`` holds ``clip_l`` (K, d1) and ``clip_g`` (K, d2), rows in
handle order, which diffusers loads once per text encoder::

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.load_lora_weights(folder)
    embeds = load_file(f"{folder}/learned_embeds.safetensors")
    pipe.load_textual_inversion(embeds["clip_l"], token=handles, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(embeds["clip_g"], token=handles, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)

(an ``embeddings`` file loads the same way, with its ``clip_l``/``clip_g`` and ``token=handle``).

The mask encoder has no counterpart in those tools and is never exported (``MASK_ENCODER_NOTE``).
Key names live in ``formats``, each family's layout in ``layouts``; the reverse direction (reading kohya or diffusers LoRA
files, starting phase 2 from one) is ``lora_import``'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmcgm import __version__
from lowmcgm.artifact import Artifact, atomic_save, load_artifact, stale_pooling_warning
from lowmcgm.errors import UserError
from lowmcgm.interop.formats import (BUNDLE_PREFIX, DIFFUSERS_EMBEDS_NAME, DIFFUSERS_LORA_NAME, peft_modules,
                                     strip_text_model)
from lowmcgm.interop.layouts import export_layout
from lowmcgm.models.dtypes import DTYPE_NAMES, torch_dtype
from lowmcgm.runs.write_guard import (check_new_files, check_not_inputs, check_writable_folder, finish_temporary,
                                      replacing)

FORMATS = ("kohya", "embeddings", "diffusers")
# kohya's ss_base_model_version -> (ss_v2, modelspec.architecture, modelspec.implementation,
# modelspec.prediction_type), as kohya's sai_model_spec.build_metadata writes them for a LoRA: an
# SDXL LoRA's keys name the SGM UNet, so kohya gives Stability's code as its implementation.
_IMPL_DIFFUSERS = "diffusers"
_IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
_VERSIONS = {
    "sd_v1": (False, "stable-diffusion-v1/lora", _IMPL_DIFFUSERS, "epsilon"),
    "sd_v2": (True, "stable-diffusion-v2-512/lora", _IMPL_DIFFUSERS, "epsilon"),
    "sd_v2_v": (True, "stable-diffusion-v2-768-v/lora", _IMPL_DIFFUSERS, "v"),
    "sdxl_base_v1-0": (False, "stable-diffusion-xl-v1-base/lora", _IMPL_STABILITY_AI, "epsilon"),
}
MASK_ENCODER_NOTE = ("Not exported: the mask encoder, which has no counterpart in A1111, ComfyUI or diffusers; "
                     "pose control by masks is lost, the subjects are kept and answer to their handles in "
                     "plain prompts.")


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    """What ``export_artifact`` wrote."""

    files: list[Path]
    handles: list[str]
    sdxl: bool = False  # an SDXL artifact: its embeddings hold a clip_l and a clip_g row
    warnings: list[str] = field(default_factory=list)  # one line each, for the user


def export_artifact(artifact_path: Path, fmt: str, out: Path, bundle_embeddings: bool = True,
                    dtype: str = "fp16", force: bool = False) -> ExportResult:
    """Export a lowmcgm artifact for other tools.

    Args:
        artifact_path: the artifact written by ``lowmcgm train``.
        fmt: ``kohya`` (``out`` is a ``.safetensors`` file), ``embeddings`` or ``diffusers``
            (``out`` is a folder, created if missing).
        out: where to write.
        bundle_embeddings: kohya only: also store the handles as ``bundle_emb.*`` (A1111 loads
            them with the LoRA; diffusers' ``load_lora_weights`` refuses such files).
        dtype: ``fp16``, ``bf16`` or ``fp32`` for the LoRA weights (alphas and embeddings stay fp32).
        force: replace files that exist (``--force``); the artifact itself is never replaced.

    Returns:
        The files written (each under a temporary name first, then renamed) and the handles.

    Raises:
        UserError: unknown format or dtype, bad output path, an output that is the artifact or
            exists (without ``force``), an artifact without LoRA (phase 2 skipped or ``full``
            mode) for ``kohya``/``diffusers``, or for ``kohya`` an SDXL UNet of unknown layout.
    """
    if fmt not in FORMATS:
        raise UserError(f"Unknown export format '{fmt}': use one of {', '.join(FORMATS)}.")
    if dtype not in DTYPE_NAMES:
        raise UserError(f"Unknown export dtype '{dtype}': use one of {', '.join(DTYPE_NAMES)}.")
    artifact = load_artifact(Path(artifact_path))
    out = Path(out).expanduser()
    files = _export_files(artifact, fmt, out)
    check_not_inputs(files, [artifact_path])
    check_new_files(files, force)
    if fmt == "kohya":
        files = [export_kohya(artifact, out, bundle_embeddings=bundle_embeddings, dtype=dtype)]
    elif fmt == "embeddings":
        files = export_embeddings(artifact, out)
    else:
        files = export_diffusers(artifact, out, dtype=dtype)
    stale = stale_pooling_warning(artifact, Path(artifact_path))
    return ExportResult(files, list(artifact.handles), sdxl=export_layout(artifact).sdxl,
                        warnings=[stale] if stale else [])


def _export_files(artifact: Artifact, fmt: str, out: Path) -> list[Path]:
    """The files an export writes, known before it writes any."""
    if fmt == "kohya":
        return [out]
    if fmt == "embeddings":
        return [out / f"{embedding_file_stem(handle)}.safetensors" for handle in artifact.handles]
    return [out / DIFFUSERS_LORA_NAME, out / DIFFUSERS_EMBEDS_NAME]


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
        for index, handle in enumerate(artifact.handles):
            for key, rows in build_embedding_tensors(artifact, index).items():
                tensors[f"{BUNDLE_PREFIX}{handle}.{key}"] = rows
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
    cast = torch_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for part, state in (("unet", artifact.unet_lora), ("text_encoder", artifact.text_encoder_lora)):
        modules = peft_modules(state, rank)
        names = export_layout(artifact).kohya_module_names(artifact, part, list(modules))
        for path, (down, up) in modules.items():
            tensors[f"{names[path]}.lora_down.weight"] = down.to(cast)
            tensors[f"{names[path]}.lora_up.weight"] = up.to(cast)
            tensors[f"{names[path]}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def build_kohya_metadata(artifact: Artifact, output_name: str) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` strings A1111, ComfyUI and kohya read (docs/interop.md, on
    using your subjects in other tools, says which)."""
    rank, alpha = _lora_rank_alpha(artifact)
    version = str(artifact.meta.get("base_model_version", ""))
    if version not in _VERSIONS:
        raise UserError(f"The artifact does not say which Stable Diffusion version it was trained on "
                        f"(base_model_version '{version}'); retrain it with this lowmcgm.")
    is_v2, architecture, implementation, prediction = _VERSIONS[version]
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
        "modelspec.implementation": implementation,
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


def build_embedding_tensors(artifact: Artifact, index: int) -> dict[str, torch.Tensor]:
    """Handle ``index``'s textual-inversion tensors (fp32), as A1111 and ComfyUI read them.

    Returns:
        ``{"string_to_param.*": (1, d)}`` for SD 1.x/2.x; for SDXL one row per text encoder,
        ``{"clip_l": (1, d1), "clip_g": (1, d2)}`` (``layouts``).
    """
    return export_layout(artifact).embedding_tensors(artifact, index)


def export_embeddings(artifact: Artifact, out_dir: Path) -> list[Path]:
    """One ``<stem>.safetensors`` per handle, in A1111's layout (``build_embedding_tensors``).

    A1111 and ComfyUI use the file name as the trigger word (``asset0``, ComfyUI
    ``embedding:asset0``); diffusers loads it with ``load_textual_inversion(file, token="<asset0>")``,
    or for SDXL each row into its encoder (the module docstring's lines).
    """
    out_dir = Path(out_dir)
    paths = [out_dir / f"{embedding_file_stem(handle)}.safetensors" for handle in artifact.handles]
    for handle, path in zip(artifact.handles, paths):
        if path.parent != out_dir:  # a handle is data, never a path: no separators, no ".."
            raise UserError(f"Handle {handle!r} cannot be a file name; handles are <name> with letters, "
                            "digits, _ or -.")
    _prepare_folder(out_dir)
    for index, (handle, path) in enumerate(zip(artifact.handles, paths)):
        atomic_save(build_embedding_tensors(artifact, index),
                    {"name": embedding_file_stem(handle), "lowmcgm_handle": handle, "lowmcgm_version": __version__},
                    path)
    return paths


def export_diffusers(artifact: Artifact, out_dir: Path, dtype: str = "fp16") -> list[Path]:
    """``pytorch_lora_weights.safetensors`` (diffusers' own writer, with alpha) and ``learned_embeds.safetensors``.

    Text-encoder keys keep the ``text_model.`` level: diffusers strips it for transformers
    versions without the wrapper and needs it for older ones, so one file serves both. SDXL's
    LoRA is written by the SDXL pipeline's writer (the same keys: ``unet.``, ``text_encoder.``).
    """
    pipeline = export_layout(artifact).pipeline_class

    rank, alpha = _lora_rank_alpha(artifact)
    out_dir = Path(out_dir)
    _prepare_folder(out_dir)
    cast = torch_dtype(dtype)
    layers: dict[str, Any] = {}
    for component, state in (("unet", artifact.unet_lora), ("text_encoder", artifact.text_encoder_lora)):
        modules = peft_modules(state, rank)
        if not modules:
            continue
        weights = {}
        for path, (down, up) in modules.items():
            key = f"text_model.{strip_text_model(path)}" if component == "text_encoder" else path
            weights[f"{key}.lora_A.weight"] = down.to(cast).contiguous()
            weights[f"{key}.lora_B.weight"] = up.to(cast).contiguous()
        # Exact module paths (without text_model.): PEFT matches a target when a module's name
        # equals it or ends with "." + it, which covers both CLIPTextModel layouts.
        targets = sorted(strip_text_model(p) for p in modules)
        layers[f"{component}_lora_layers"] = weights
        layers[f"{component}_lora_adapter_metadata"] = {
            "r": rank, "lora_alpha": float(alpha), "target_modules": targets, "lora_dropout": 0.0,
            "bias": "none", "init_lora_weights": True,
        }
    lora_path = out_dir / DIFFUSERS_LORA_NAME
    with replacing(lora_path) as tmp:  # diffusers writes the file by name: the temporary's, in the same folder
        pipeline.save_lora_weights(out_dir, weight_name=tmp.name, **layers)
        finish_temporary(tmp)
    embeds_path = out_dir / DIFFUSERS_EMBEDS_NAME
    atomic_save(build_diffusers_embeddings(artifact), {"lowmcgm_version": __version__,
                                                       "lowmcgm_handles": json.dumps(artifact.handles)}, embeds_path)
    return [lora_path, embeds_path]


def build_diffusers_embeddings(artifact: Artifact) -> dict[str, torch.Tensor]:
    """``learned_embeds.safetensors``'s tensors (fp32).

    Returns:
        ``{handle: (d,)}`` for SD 1.x/2.x, each entry one ``load_textual_inversion({token: vector})``;
        for SDXL ``{"clip_l": (K, d1), "clip_g": (K, d2)}``, rows in handle order (``layouts``).
    """
    return export_layout(artifact).diffusers_embeddings(artifact)


def _lora_rank_alpha(artifact: Artifact) -> tuple[int, float]:
    lora = artifact.meta.get("lora") or {}
    if lora.get("mode") == "full":
        raise UserError("This artifact fine-tuned all UNet weights (lora.phase2_mode=full): it has no LoRA to "
                        "export; export --format embeddings still works, or retrain with phase2_mode=lora.")
    if not artifact.unet_lora and not artifact.text_encoder_lora:
        raise UserError("This artifact has no LoRA (trained with train.phase2_steps=0): only "
                        "--format embeddings applies.")
    return int(lora["rank"]), float(lora["alpha"])


def _prepare_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"Output path {folder} exists and is not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the output folder {folder} ({exc.strerror}); choose another --out.") from exc
    check_writable_folder(folder)  # by writing: root passes os.access on read-only file systems
