"""The single artifact file (handles + mask encoder + LoRA) and resume checkpoints.

Both are safetensors files with string metadata; nothing is ever unpickled. Writes go to a
temporary name and are renamed, so an interrupted save leaves the previous file intact. The loader
checks the header (size, dtypes, shapes, offsets, names) against the file before reading tensors,
so a hostile or damaged file is refused with a UserError, not a crash or a huge allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowmcgm import __version__
from lowmcgm.errors import UserError
from lowmcgm.limits import MAX_LORA_RANK, MAX_MASK_SIZE, MAX_RESOLUTION_PX, MAX_TEXT_WIDTH
from lowmcgm.models.dtypes import torch_dtype
from lowmcgm.runs.write_guard import finish_temporary, replacing

FORMAT_NAME = "lowmcgm"
FORMAT_VERSION = 3  # the newest this lowmcgm writes and reads
# 2: the mask encoder may carry options (metadata ``mask_encoder_input``, ``mask_token_norm``) and
# a LayerNorm (``mask_encoder.norm.*``). An artifact without them is still written as format 1, so
# the paper's recipe stays readable by older lowmcgm; an older reader refuses a format-2 file
# rather than sampling with the wrong encoder.
# 3: SDXL: the handles' rows in the second text encoder (``handles.vectors_2``); ``text_width`` is
# the UNet's context width, both rows' widths together. Only SDXL artifacts are written as 3.
READ_FORMAT_VERSIONS = ("1", "2", "3")
ENCODER_OPTION_META = {"mask_encoder_input": ("binary", "area_normalized"), "mask_token_norm": ("none", "layernorm")}
# Where an SDXL artifact's pooled embedding was taken in training. Artifacts written before the
# key existed pooled at the highest token id, a handle's (text_conditioning.pool_at_end_of_text).
SDXL_POOLING_KEY, SDXL_POOLING = "sdxl_pooling", "end_of_text"
CHECKPOINT_FORMAT_VERSION = 1
# A rank-128 SD artifact has a few thousand tensors; its header stays well under 1 MiB.
MAX_HEADER_BYTES = 16 * 2**20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file through a temporary name; the old file survives a crash."""
    with replacing(path) as tmp:  # a read-only folder or a full disk: one line naming the file
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as fh:
            _sort_metadata(fh)
        finish_temporary(tmp)  # the writer creates 0600; a shared artifact should be readable


def _sort_metadata(fh: Any) -> None:
    """Rewrite the header of the safetensors file open in ``fh`` with its metadata in sorted order.

    safetensors writes ``__metadata__`` from a Rust HashMap, in an order that changes from process
    to process; sorted, the same run gives the same bytes (and so the same sha256) every time. The
    header keeps its length (padded with spaces, as safetensors pads), so no tensor data moves.
    """
    fh.seek(0)
    (length,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(length))
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # another escaping than serde's: keep the file as written
        return
    fh.seek(8)
    fh.write(text + b" " * (length - len(text)))


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data.

    Returns:
        (tensor entries by name, metadata). Raises UserError on anything inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"File not found: {path}.")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is not a safetensors file (too short).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(max_header_bytes, size - 8):
            raise UserError(f"{path} is not a valid safetensors file (header of {header_len} bytes "
                            f"in a file of {size} bytes).")
        try:
            header = json.loads(fh.read(header_len), object_pairs_hook=_refuse_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
            # RecursionError: deeply nested JSON; ValueError: a repeated key (two readers could
            # then disagree about which entry counts).
            raise UserError(f"{path} is not a valid safetensors file (unreadable header).") from exc
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a valid safetensors file (header is not a table).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path} has malformed metadata.")
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] in _DTYPE_BYTES
              and isinstance(entry.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(type(o) is int for o in entry["data_offsets"]))
        if not ok:
            raise UserError(f"{path}: tensor entry {name!r} is malformed.")
        start, end = entry["data_offsets"]
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if not 0 <= start <= end <= data_len or end - start != numel * _DTYPE_BYTES[entry["dtype"]]:
            raise UserError(f"{path}: tensor {name!r} claims a size or position that the file does not "
                            "have (truncated or forged file).")
        spans.append((start, end))
    # safetensors demands that the tensors tile the data exactly, without gaps, overlaps or a tail;
    # checking it here keeps its loader from ever meeting a file we let through.
    covered = 0
    for start, end in sorted(spans):
        if start != covered:
            raise UserError(f"{path}: tensors overlap or leave gaps in the data (damaged or forged file).")
        covered = end
    if covered != data_len:
        raise UserError(f"{path}: {data_len - covered} bytes after the last tensor (damaged or forged file).")
    return header, metadata


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table = dict(pairs)
    if len(table) != len(pairs):
        raise ValueError("repeated key")
    return table


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Artifact:
    """What a training run produces, in memory."""

    handles: list[str]
    # The handles' rows per text encoder the run trained, first one first: (K, d_i) each. The file
    # keys them by position (``vectors_key``); the format asks no family what the rows are.
    handle_vector_sets: list[torch.Tensor]
    mask_encoder: dict[str, torch.Tensor]  # empty when trained without mask tokens
    unet_lora: dict[str, torch.Tensor]
    text_encoder_lora: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def handle_vectors(self) -> torch.Tensor:
        """The handles' rows in the first text encoder (the only one of SD 1.x/2.x)."""
        return self.handle_vector_sets[0]

    def vector_tensors(self) -> dict[str, torch.Tensor]:
        """The handle rows under their file keys."""
        return {vectors_key(i): vectors for i, vectors in enumerate(self.handle_vector_sets)}

    @property
    def text_width(self) -> int:
        """The width of the UNet's context tokens (and of the mask tokens): SDXL concatenates both
        encoders' states, so there it is both rows' widths together."""
        return sum(int(vectors.shape[1]) for vectors in self.handle_vector_sets)

    @property
    def uses_mask_tokens(self) -> bool:
        return bool(self.mask_encoder)


_JSON_META = ("handles", "init_words", "lora", "training_config")


def vectors_key(index: int) -> str:
    """The file key (and checkpoint key) of the ``index``-th text encoder's handle rows."""
    return "handles.vectors" if index == 0 else f"handles.vectors_{index + 1}"


def vector_keys_in(names: Any) -> list[str]:
    """The handle-row keys among ``names``, in encoder order, up to the first one missing."""
    keys = []
    while vectors_key(len(keys)) in names:
        keys.append(vectors_key(len(keys)))
    return keys


def stale_pooling_warning(artifact: Artifact, path: Path) -> str | None:
    """One line for an SDXL artifact trained with the pooled embedding taken at the handle token
    (lowmcgm before the pooling fix); None for every other artifact."""
    # Imported here: the families bring diffusers' pipelines, which reading an artifact does not need.
    from lowmcgm.models.families import families_with_text_encoders

    pooled = any(f.pooled_embedding for f in families_with_text_encoders(len(artifact.handle_vector_sets)))
    if not pooled or artifact.meta.get(SDXL_POOLING_KEY) == SDXL_POOLING:
        return None
    return (f"{path} was trained with SDXL's pooled embedding taken at the handle token (an older lowmcgm); "
            "it now gets the pooled embedding of the whole prompt, as other SDXL tools give it: retrain it "
            "for the right pooled embedding.")


def save_artifact(artifact: Artifact, path: Path, dtype: str = "fp16") -> None:
    """Write the artifact (weights in ``dtype``) atomically, with its metadata."""
    cast = torch_dtype(dtype)
    tensors = {k: v.to(cast) for k, v in artifact.vector_tensors().items()}
    tensors.update({f"mask_encoder.{k}": v.to(cast) for k, v in artifact.mask_encoder.items()})
    tensors.update({f"unet.{k}": v.to(cast) for k, v in artifact.unet_lora.items()})
    tensors.update({f"text_encoder.{k}": v.to(cast) for k, v in artifact.text_encoder_lora.items()})
    # Rows for more than one text encoder came with format 3; format 2 with the encoder's options.
    version = 3 if len(artifact.handle_vector_sets) > 1 else (
        2 if any(k in artifact.meta for k in ENCODER_OPTION_META) else 1)
    meta = {"format": FORMAT_NAME, "format_version": str(version), "lowmcgm_version": __version__,
            "handles": artifact.handles}
    meta.update(artifact.meta)
    meta["handles"] = artifact.handles
    strings = {k: json.dumps(v) if k in _JSON_META else str(v) for k, v in meta.items()}
    atomic_save(tensors, strings, path)


def load_artifact(path: Path) -> Artifact:
    """Read and validate an artifact; every problem is a UserError naming the file."""
    path = Path(path)
    header, meta = read_header(path)
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a lowmcgm artifact (no 'format: lowmcgm' in its metadata).")
    version = meta.get("format_version", "?")
    if version not in READ_FORMAT_VERSIONS:
        raise UserError(f"{path} has artifact format {version} (written by lowmcgm "
                        f"{meta.get('lowmcgm_version', '?')}); this lowmcgm reads formats "
                        f"{' and '.join(READ_FORMAT_VERSIONS)}: upgrade lowmcgm.")
    parsed = _parse_meta(path, meta, header)
    handles, lora = parsed["handles"], parsed.get("lora", {})
    _check_shapes(path, header, handles, int(parsed["text_width"]), int(parsed.get("mask_size", 0)), lora,
                  parsed.get("mask_token_norm", "none"))
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # read_header let through a file safetensors refuses: still the user's file
        raise UserError(f"{path} could not be read as safetensors ({exc}).") from exc
    sub = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return Artifact(
        handles=handles, handle_vector_sets=[tensors[key].float() for key in vector_keys_in(tensors)],
        mask_encoder={k: v.float() for k, v in sub("mask_encoder.").items()},
        unet_lora={k: v.float() for k, v in sub("unet.").items()},
        text_encoder_lora={k: v.float() for k, v in sub("text_encoder.").items()},
        meta={k: v for k, v in parsed.items() if k not in ("format", "format_version", "handles")},
    )


# Metadata the readers (sampler, export, inspect) use, and the type each must have; a value of the
# wrong type is refused here so no reader meets it (an artifact may come from a stranger).
# Every whole number a reader allocates from, with its range (an artifact may come from a stranger:
# 'resolution' 2**20 would make sample allocate until it dies). Resolution 0 means the base model's.
_INT_META = {"text_width": (1, MAX_TEXT_WIDTH, 1), "mask_size": (0, MAX_MASK_SIZE, 1),
             "resolution": (0, MAX_RESOLUTION_PX, 8)}  # (lowest, highest, multiple of)
_STR_LIST_META = ("init_words",)
_LORA_MODES = ("lora", "full")


def _parse_meta(path: Path, meta: dict[str, str], header: dict[str, Any]) -> dict[str, Any]:
    """The artifact's string metadata, decoded and type-checked; handle names are checked too."""
    from lowmcgm.handles import HANDLE_PATTERN

    def bad(why: str) -> UserError:
        return UserError(f"{path} has malformed artifact metadata: {why}.")

    parsed: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            parsed[key] = json.loads(value) if key in _JSON_META else value
        except (json.JSONDecodeError, RecursionError) as exc:
            raise bad(f"'{key}' is not JSON") from exc
    for key, (low, high, multiple) in _INT_META.items():  # checked here, kept as strings (readers call int())
        if key in parsed:
            try:
                number = int(parsed[key])
            except ValueError as exc:
                raise bad(f"'{key}' is not a whole number") from exc
            if not low <= number <= high or number % multiple:
                raise bad(f"'{key}' is {number}, outside {low}-{high}" + (f" or not a multiple of {multiple}"
                                                                          if multiple > 1 else ""))
    for key in _JSON_META:
        try:
            in_range = key not in parsed or _numbers_in_range(parsed[key])
        except RecursionError:  # nested as deep as the JSON reader allowed
            in_range = False
        if not in_range:
            raise bad(f"'{key}' holds a number that is not finite or beyond 64 bits")
    if "text_width" not in parsed or int(parsed["text_width"]) <= 0:
        raise bad("no text_width")
    handles = parsed.get("handles")
    if not isinstance(handles, list) or not handles or not all(isinstance(h, str) for h in handles):
        raise bad("no list of handle names")
    for handle in handles:
        # Handle names become tokens, file names (export) and prompt text: only the plain names
        # training allows are accepted, never separators, format fields or markup.
        if not HANDLE_PATTERN.match(handle):
            raise bad(f"handle name {handle!r} is not of the form <name> (letters, digits, _ or -)")
    if len(set(handles)) != len(handles):
        raise bad("handle names repeat")
    for key in _STR_LIST_META:
        if key in parsed and not (isinstance(parsed[key], list) and all(isinstance(v, str) for v in parsed[key])):
            raise bad(f"'{key}' is not a list of words")
    for key, choices in ENCODER_OPTION_META.items():
        if key in parsed and parsed[key] not in choices:
            raise bad(f"'{key}' must be one of {', '.join(choices)}")
    if SDXL_POOLING_KEY in parsed and parsed[SDXL_POOLING_KEY] != SDXL_POOLING:
        raise bad(f"'{SDXL_POOLING_KEY}' must be {SDXL_POOLING}")
    if "training_config" in parsed and not isinstance(parsed["training_config"], dict):
        raise bad("'training_config' is not a table")
    lora = parsed.get("lora", {})
    has_adapter = any(k.startswith(("unet.", "text_encoder.")) for k in header)
    if not isinstance(lora, dict):
        raise bad("'lora' is not a table")
    if has_adapter or lora:
        targets = [lora.get("unet_targets", []), lora.get("text_encoder_targets", [])]
        ok = (lora.get("mode", "lora") in _LORA_MODES and type(lora.get("rank")) is int
              and 0 < lora["rank"] <= MAX_LORA_RANK
              and type(lora.get("alpha")) in (int, float) and math.isfinite(lora["alpha"])
              and all(isinstance(t, list) and all(isinstance(n, str) for n in t) for t in targets))
        if not ok:
            raise bad("'lora' needs a positive whole rank, a finite alpha, and lists of target names")
    return parsed


def _numbers_in_range(value: Any) -> bool:
    """Every number inside a decoded JSON value is finite and fits 64 bits (Python's JSON reads NaN,
    Infinity and integers of any length)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):
        return -2**63 <= value < 2**64
    if isinstance(value, dict):
        return all(_numbers_in_range(v) for v in value.values())
    if isinstance(value, list):
        return all(_numbers_in_range(v) for v in value)
    return True


def _check_shapes(path: Path, header: dict[str, Any], handles: list[str], text_width: int,
                  mask_size: int, lora: dict[str, Any], mask_token_norm: str = "none") -> None:
    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a valid lowmcgm artifact: {why}.")

    for name, entry in header.items():
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise bad(f"tensor {name} has dtype {entry['dtype']}")
        if not name.startswith(("handles.", "mask_encoder.", "unet.", "text_encoder.")):
            raise bad(f"unexpected tensor {name}")
    # The rows of every text encoder after the first (SDXL's second) and the first's make up the
    # context width together.
    keys = vector_keys_in(header)
    stray = next((k for k in header if k.startswith("handles.") and k not in keys), None)
    if stray is not None:
        raise bad(f"unexpected tensor {stray}")
    first_width = text_width
    for key in keys[1:]:
        shape = header[key]["shape"]
        if len(shape) != 2 or shape[0] != len(handles) or not 0 < shape[1] < first_width:
            raise bad(f"{key} must be {len(handles)} rows narrower than {first_width}")
        first_width -= shape[1]
    if header.get("handles.vectors", {}).get("shape") != [len(handles), first_width]:
        raise bad(f"handles.vectors must be {len(handles)}x{first_width}")
    enc = {k for k in header if k.startswith("mask_encoder.")}
    if enc:
        expected = {"mask_encoder.proj.weight", "mask_encoder.proj.bias"}
        if mask_token_norm == "layernorm":
            expected |= {"mask_encoder.norm.weight", "mask_encoder.norm.bias"}
        if enc != expected or mask_size <= 0:
            raise bad("mask encoder tensors are incomplete")
        if any(header[k]["shape"] != [text_width] for k in expected if ".norm." in k):
            raise bad(f"mask encoder norm must have {text_width} values")
        if header["mask_encoder.proj.weight"]["shape"] != [text_width, mask_size * mask_size] or \
                header["mask_encoder.proj.bias"]["shape"] != [text_width]:
            raise bad(f"mask encoder must map {mask_size}x{mask_size} masks to {text_width} values")
    rank = lora.get("rank") if isinstance(lora, dict) else None
    for name, entry in header.items():
        if ".lora_A." in name or ".lora_B." in name:
            shape = entry["shape"]
            if len(shape) not in (2, 4) or rank is None:
                raise bad(f"LoRA tensor {name} has shape {shape}")
            if (".lora_A." in name and shape[0] != rank) or (".lora_B." in name and shape[1] != rank):
                raise bad(f"LoRA tensor {name} does not have rank {rank}")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in info["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    info: dict[str, Any]) -> None:
    """A resume checkpoint: trainable weights (fp32), optimizer state and JSON-able ``info``."""
    opt_tensors, opt_info = _flatten_optimizer(optimizer_state)
    tensors = {f"weights.{k}": v for k, v in weights.items()}
    tensors.update(opt_tensors)
    meta = {"format": "lowmcgm-checkpoint", "format_version": str(CHECKPOINT_FORMAT_VERSION),
            "info": json.dumps(info), "optimizer": json.dumps(opt_info)}
    atomic_save(tensors, meta, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Inverse of ``save_checkpoint``: (weights, optimizer state dict, info)."""
    _, meta = read_header(path)
    if meta.get("format") != "lowmcgm-checkpoint" or meta.get("format_version") != str(CHECKPOINT_FORMAT_VERSION):
        raise UserError(f"{path} is not a lowmcgm checkpoint of format {CHECKPOINT_FORMAT_VERSION}.")
    tensors = load_file(str(path))
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return weights, _unflatten_optimizer(opt, json.loads(meta["optimizer"])), json.loads(meta["info"])
