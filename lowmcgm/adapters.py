"""PEFT LoRA on the UNet (and optionally the text encoder), and the adapters' state dicts.

Uses ``peft.inject_adapter_in_model`` rather than ``text_encoder.add_adapter``: transformers 5.24
demands a peft release that does not exist. Trainable weights stay fp32 whatever the frozen dtype
(half-precision trainables break gradient unscaling).
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from lowmcgm.errors import UserError

ADAPTER_NAME = "default"


def add_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> list[nn.Parameter]:
    """Inject LoRA layers into ``model`` (zero-initialised up-projections: the output is unchanged).

    Returns:
        The new trainable parameters, in fp32.
    """
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                            init_lora_weights=True)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise UserError(f"LoRA targets {', '.join(targets)} match no module of "
                        f"{type(model).__name__}: {exc}") from exc
    params = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights (``...to_q.lora_A.weight``), detached copies."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights from ``lora_state_dict`` into a model that ``add_lora`` prepared."""
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as exc:  # torch: "size mismatch for ..." (a file made for another model)
        detail = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"LoRA weights do not fit this model ({detail}); they were made for another base "
                        "model or rank.") from exc
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"LoRA weights do not fit this model: unexpected {unexpected[0]} "
                        f"and {len(unexpected) - 1} more.")


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA (for export naming checks)."""
    return sorted({name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name})


# Largest finite float8_e4m3fn value: a weight's largest magnitude is stored as it (OneTrainer's LinearFp8).
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


class StoredInFp8(nn.Module):
    """A frozen weight kept in float8_e4m3fn with a per-tensor scale, read in ``compute_dtype`` as
    ``stored * scale`` (torch parametrization; the scale is an fp32 buffer, so it moves with ``.to()``).

    Each read makes a new tensor, so autograd saves the upcast copy, not the stored weight (which is
    why diffusers' layerwise casting hooks, which cast the module back after its forward, serve
    inference only). Under gradient checkpointing the copies live one block at a time.
    """

    def __init__(self, compute_dtype: torch.dtype, scale: torch.Tensor):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.register_buffer("scale", scale)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.compute_dtype).mul_(self.scale)  # in place: one upcast copy, not two


def compute_fp8_scale(weight: torch.Tensor) -> torch.Tensor:
    """max |w| / 448 as a 0-d fp32 tensor on ``weight``'s device (1 for an all-zero weight).

    Without it, weights of an SD/SDXL UNet (std 0.004-0.02) fall among fp8's subnormals (below
    2**-6), where a plain cast loses 3-15 % of a layer's norm and zeroes up to 15 % of its weights;
    with it, 2.6 % and none (docs/benchmarks.md, "fp8 storage: rounding error per layer"). No
    ``.item()``: no device sync.
    """
    amax = weight.detach().abs().amax().float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as fp8 storage keeps it: divided by its scale (``compute_fp8_scale``), rounded to
    float8_e4m3fn. ``StoredInFp8(dtype, scale)(stored)`` reads it back.

    Args:
        weight: any shape and floating dtype.

    Returns:
        (stored, scale): ``stored`` float8_e4m3fn of ``weight``'s shape, ``scale`` a 0-d fp32 tensor.
    """
    scale = compute_fp8_scale(weight)
    scaled = (weight.detach().float() / scale).clamp_(-FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn), scale


def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Frozen Linear and Conv2d weights of ``model`` stored in fp8 (``model.fp8_base``) with a
    per-tensor scale, as OneTrainer's ``LinearFp8``. Norms, embeddings (the handles' rows train in
    the token table's wrapper), biases and LoRA layers keep their dtype; LoRA added later keeps fp32
    weights."""
    from torch.nn.utils import parametrize

    for name, module in model.named_modules():
        if "lora_" in name or parametrize.is_parametrized(module, "weight"):  # PEFT's lora_A/B; stored already
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.requires_grad:
            # Stored first: a parametrization may not change the stored dtype itself.
            module.weight.data, scale = quantize_fp8(module.weight.data)
            parametrize.register_parametrization(module, "weight", StoredInFp8(compute_dtype, scale), unsafe=True)


def is_stored_in_fp8(model: nn.Module) -> bool:
    return any(isinstance(m, StoredInFp8) for m in model.modules())


def cast_keeping_fp8(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype=dtype)``, except that weights stored in fp8 stay so, with their fp32 scales,
    and are read in ``dtype``."""
    kept = set()
    for module in model.modules():
        if isinstance(module, StoredInFp8):
            module.compute_dtype = dtype
            kept.add(id(module.scale))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.dtype not in (dtype, torch.float8_e4m3fn) and id(tensor) not in kept:
            tensor.data = tensor.data.to(dtype)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (fp16/bf16 halves their memory), trainable ones to fp32."""
    for param in model.parameters():
        param.data = param.data.float() if param.requires_grad else param.data.to(dtype)
