"""Gradient checkpointing for training: what is recomputed in backward instead of kept.

The UNet: diffusers' own checkpointing recomputes each resnet and each transformer block, but runs
an attention module's group norm, input and output projections (and their LoRA layers) outside any
checkpoint, so their inputs stay in memory: at SD 1.5's 64x64 level about 17 MiB per module, 0.13
GiB of a 512 px step in all (``tools/bench_memory.py --kohya``'s itemised difference, by
``lowmcgm.memory.saved_activations``). kohya's U-Net checkpoints each attention module whole. Here an
attention module with one transformer block (SD 1.x and 2.x) is checkpointed whole too, its block's
own checkpoint turned off: the same recomputation plus those few layers. One with several blocks
(SDXL: 2 or 10) keeps diffusers' per-block checkpoints, since recomputing it whole would hold every
block's activations at once in its backward.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from diffusers import Transformer2DModel


def checkpoint_unet(unet: torch.nn.Module) -> int:
    """Switch on ``unet``'s gradient checkpointing, each one-block attention module whole.

    Only in training mode and with gradients on (as transformers' checkpointing): sampling, and
    latent pose guidance's own checkpointing, run the modules as they are.

    Calling it again on the same UNet changes nothing (a module is never checkpointed inside itself).

    Returns:
        How many attention modules are checkpointed whole.
    """
    unet.enable_gradient_checkpointing()
    whole = 0
    for module in unet.modules():
        if isinstance(module, Transformer2DModel) and len(module.transformer_blocks) == 1:
            whole += 1
            module.gradient_checkpointing = False  # its block is recomputed with the whole module instead
            if not getattr(module.forward, "recomputes_whole_module", False):  # not wrapped already
                module.forward = _recomputed_in_backward(module, module.forward)
    return whole


def release_unet(unet: torch.nn.Module) -> None:
    """Undo :func:`checkpoint_unet`: the modules' own forward back, diffusers' checkpointing off.

    A base that trained is sampled next (``lowmcgm run``, the page); latent pose guidance decides
    for itself whether its pass is checkpointed (``ModelFamily.guidance_checkpointing``).
    """
    for module in unet.modules():
        if getattr(module.forward, "recomputes_whole_module", False):
            del module.forward  # the instance attribute: the class's forward again
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()


def _recomputed_in_backward(module: torch.nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    run.recomputes_whole_module = True  # type: ignore[attr-defined]
    return run


def checkpoint_text_encoder(encoder: torch.nn.Module) -> None:
    """Recompute ``encoder``'s layers in backward (``model.text_encoder_checkpointing``).

    transformers checkpoints only modules in training mode; CLIP's dropout is 0, so train mode
    changes nothing else. Non-reentrant, as the UNet's: the handles' rows are the only input that
    needs a gradient, and they enter through the embedding, before the first checkpointed layer.
    """
    # transformers 5 names it activation_checkpointing_enable; 4.x has only the older name.
    enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    encoder.train()


def release_text_encoder(encoder: torch.nn.Module) -> None:
    """Undo :func:`checkpoint_text_encoder` (eval mode again, as loaded)."""
    if text_encoder_checkpointed(encoder):
        disable = getattr(encoder, "activation_checkpointing_disable", None) or encoder.gradient_checkpointing_disable
        disable()
    encoder.eval()


def text_encoder_checkpointed(encoder: torch.nn.Module) -> bool:
    """Whether ``encoder`` recomputes its layers in backward (transformers 5 deprecates the 4.x name)."""
    if hasattr(type(encoder), "is_activation_checkpointing"):
        return bool(encoder.is_activation_checkpointing)
    return bool(getattr(encoder, "is_gradient_checkpointing", False))
