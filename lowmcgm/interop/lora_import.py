"""Reading LoRA files other tools wrote (kohya/A1111, diffusers, lowmcgm) and loading them.

``read_lora_file`` parses a file into modules with ranks and alphas; ``summarize_lora`` is what
``lowmcgm import-lora`` prints; ``check_init_lora`` and ``load_init_lora`` start phase 2 from such
a file (``lora.init_lora``), checked against the base model before any step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lowmcgm.adapters import ADAPTER_NAME, load_lora_state_dict
from lowmcgm.artifact import load_artifact, read_header
from lowmcgm.errors import UserError
from lowmcgm.interop.formats import (A1111_EMBEDDING_KEY, BUNDLE_PREFIX, DIFFUSERS_LORA_NAME, DIFFUSERS_METADATA_KEY,
                                     KOHYA_SUFFIXES, KOHYA_TE_PREFIX, KOHYA_UNET_PREFIX, OTHER_ADAPTERS,
                                     TE_TARGET_NAMES, UNET_TARGET_NAMES, peft_modules, strip_text_model)
from lowmcgm.interop.layouts import layout_of_lora_file


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
    layout = layout_of_lora_file(header, metadata)
    if metadata.get("format") == "lowmcgm" and layout.importable:  # an artifact of one text encoder
        return _read_lowmcgm(path)
    other = next((k for k in header if any(tag in k for tag in OTHER_ADAPTERS)), None)
    if other:
        raise UserError(f"{path} is not a plain LoRA (it has {other}: DoRA or a LyCORIS type); only plain "
                        "kohya or diffusers LoRA files can start training.")
    if not layout.importable:
        raise UserError(f"{path} is an {layout.label} LoRA; lowmcgm starts phase 2 from SD 1.x/2.x LoRAs only.")
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
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
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
        modules = peft_modules(state, int(lora["rank"]))
        parts.append({strip_text_model(p): LoraModule(down, up, alpha) for p, (down, up) in modules.items()})
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
        module_path = strip_text_model(match.group(1)) if component == "text_encoder" else match.group(1)
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
    unet_targets = _target_names(lora.unet, UNET_TARGET_NAMES, lora.format)
    te_targets = _target_names(lora.text_encoder, TE_TARGET_NAMES, lora.format)
    settings: list[str] = []
    if len(lora.ranks) == 1 and len(lora.alphas) == 1:
        settings = [f"lora.init_lora={lora.path}", f"lora.rank={lora.ranks[0]}", f"lora.alpha={lora.alphas[0]:g}"]
        if lora.text_encoder:
            settings.append("lora.use_text_encoder_lora=true")
        if not set(unet_targets) <= set(UNET_TARGET_NAMES):
            settings.append("lora.unet_targets=" + ",".join(unet_targets))
        if not set(te_targets) <= set(TE_TARGET_NAMES):
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
    bad = next((name for name, m in {**lora.unet, **lora.text_encoder}.items()
                if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())), None)
    if bad is not None:
        raise UserError(f"lora.init_lora {lora.path} holds NaN/inf values (in {bad}): training cannot start "
                        "from it; export it again from a healthy run, or train without lora.init_lora.")
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
        plain = strip_text_model(module_path)
        names[kohya_prefix + plain.replace(".", "_") if kohya_prefix else plain] = (module_path, module)
    return names


def _has_adapter(module: nn.Module) -> bool:
    lora_a = getattr(module, "lora_A", None)
    return isinstance(lora_a, nn.ModuleDict) and ADAPTER_NAME in lora_a


def _config_name(module_path: str) -> str:
    known = UNET_TARGET_NAMES + TE_TARGET_NAMES
    hit = next((t for t in known if module_path.endswith("." + t)), None)
    if hit:
        return hit
    head, _, last = module_path.rpartition(".")
    # Sequential children are numbered (to_out.0): a bare number would match every module.
    return f"{head.rpartition('.')[2]}.{last}" if last.isdigit() else last
