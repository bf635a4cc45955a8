"""Floating-point precisions by the names config files, flags and file headers use: one table.

``fp16``, ``bf16`` and ``fp32`` everywhere (``output.save_dtype``, sample ``--dtype``, export
``--dtype``); accelerate's ``"no"`` mixed precision means fp32 weights. The names are importable
without torch (the configuration and the CLI's parser read them); the torch dtypes are looked up
when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp16", "bf16", "fp32")


def torch_dtype(name: str) -> torch.dtype:
    """``"fp16"`` -> ``torch.float16``; one of ``DTYPE_NAMES``."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen weights' dtype for an accelerate ``mixed_precision`` ("no", "fp16", "bf16")."""
    return torch_dtype("fp32" if mixed_precision == "no" else mixed_precision)
