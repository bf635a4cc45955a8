"""What makes fake CUDA tensors behave like a GPU: the process patches of a fake session.

A fake session (:mod:`lowmcgm.memory.session`) runs under torch's ``FakeTensorMode`` (shapes and
dtypes, no data) in a process where the shim (:mod:`lowmcgm.memory.shim`) made CUDA look present.
This module supplies the rest: :class:`CpuStaysReal` (CPU-side work stays real) and
:func:`fake_cuda_patches` (attention kernels picked as a real GPU would, ``torch.utils.swap_tensors``
on fake tensors, autocast's and the optimizers' CUDA policies, ``torch.cuda`` memory statistics that
read the fake counter). Counting the bytes is left to :mod:`lowmcgm.memory.counters`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowmcgm.memory.counters import LiveBytes

_ORIG_SDPA = F.scaled_dot_product_attention
_ORIG_SWAP = torch.utils.swap_tensors


class CpuStaysReal(TorchDispatchMode):
    """Under a FakeTensorMode, let ops that touch no fake tensor and no CUDA device run for real.

    Data preparation, CPU random draws, masks and ``.item()`` on CPU tensors then behave as usual
    (and meta-device model building stays plain meta). ``.item()`` of a fake tensor returns
    ``item_value`` (0): there is no data to read.
    """

    def __init__(self, item_value: float = 0):
        super().__init__()
        self.item_value = item_value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            t = args[0]
            if t.dtype == torch.bool:
                return bool(self.item_value)
            return (float(self.item_value) if t.dtype.is_floating_point or t.dtype.is_complex
                    else int(self.item_value))
        if any(isinstance(x, FakeTensor) for x in leaves) or any(
            isinstance(x, torch.device) and x.type == "cuda" for x in leaves
        ):
            return func(*args, **kwargs)
        with unset_fake_temporarily():
            return func(*args, **kwargs)


def _fake_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """``F.scaled_dot_product_attention`` as a real GPU would dispatch it (never the math kernel).

    On a CPU build, fake CUDA tensors always take the math kernel, which stores (B, H, L, L)
    probabilities in fp32; a GPU picks flash attention (fp16/bf16, head dim <= 256, no mask) or
    memory-efficient attention.
    """
    if not isinstance(query, FakeTensor) or query.device.type != "cuda" or enable_gqa:
        return _ORIG_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if torch.is_autocast_enabled("cuda"):  # autocast lists SDPA as lower precision
        dt = torch.get_autocast_dtype("cuda")
        query, key, value = (x.to(dt) if x.is_floating_point() else x for x in (query, key, value))
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if (attn_mask is None and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256 and query.shape[-1] == value.shape[-1]):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # as the real dispatcher: boolean mask -> additive bias
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device
                                    ).masked_fill(attn_mask.logical_not(), float("-inf"))
        elif attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale)[0]


def _swap_tensors_fake_ok(t1, t2):
    """``torch.utils.swap_tensors`` that also works for fake tensors.

    The swap fails because FakeTensorMode's memo keeps a weak reference to every fake Parameter;
    dropping those memo entries (only used to map real tensors to their fakes) allows it, and with
    it ``Module.to()``, ``.half()``, ``.to_empty()`` and peft's ``add_adapter`` on fake modules.
    """
    for t in (t1, t2):
        if isinstance(t, FakeTensor):
            memo = t.fake_mode.fake_tensor_converter.meta_converter.tensor_memo
            keys = [r.key for r in weakref.getweakrefs(t) if isinstance(r, weakref.KeyedRef)]
            for k in keys:
                if memo.get(k) is t:
                    del memo[k]
    return _ORIG_SWAP(t1, t2)


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _appended(lst: list, item: Any) -> Iterator[None]:
    added = item not in lst
    if added:
        lst.append(item)
    try:
        yield
    finally:
        if added and item in lst:
            lst.remove(item)


@contextlib.contextmanager
def fake_cuda_patches(counter: LiveBytes | None = None) -> Iterator[None]:
    """The process patches that make fake CUDA behave like a GPU (README points 2 and 3, and more).

    - ``torch.autocast("cuda")`` and ``GradScaler`` apply their CUDA policy (they would disable
      themselves: "CUDA is not available").
    - ``F.scaled_dot_product_attention`` picks flash / memory-efficient kernels (:func:`_fake_sdpa`).
    - ``torch.utils.swap_tensors`` accepts fake tensors (:func:`_swap_tensors_fake_ok`).
    - Optimizers and ``clip_grad_norm_`` default to their foreach implementations as on CUDA
      (``FakeTensor`` added to the types that qualify).
    - ``torch.cuda.memory_allocated``/``max_memory_allocated``/``reset_peak_memory_stats`` read
      ``counter``; ``torch.cuda.synchronize``/``empty_cache`` do nothing.
    """
    import torch.cuda.amp.common as amp_common
    import torch.optim.optimizer as optim_mod
    import torch.utils._foreach_utils as foreach_utils

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(amp_common, "amp_definitely_not_available", lambda: False))
        stack.enter_context(_patched(F, "scaled_dot_product_attention", _fake_sdpa))
        stack.enter_context(_patched(torch.utils, "swap_tensors", _swap_tensors_fake_ok))
        stack.enter_context(_appended(optim_mod._foreach_supported_types, FakeTensor))
        stack.enter_context(_appended(foreach_utils._foreach_supported_types, FakeTensor))
        stack.enter_context(_patched(torch.cuda, "synchronize", lambda device=None: None))
        stack.enter_context(_patched(torch.cuda, "empty_cache", lambda: None))
        if counter is not None:
            stack.enter_context(_patched(torch.cuda, "memory_allocated",
                                         lambda device=None: counter.current))
            stack.enter_context(_patched(torch.cuda, "max_memory_allocated",
                                         lambda device=None: counter.peak))
            stack.enter_context(_patched(torch.cuda, "reset_peak_memory_stats",
                                         lambda device=None: counter.reset_peak()))
        yield

