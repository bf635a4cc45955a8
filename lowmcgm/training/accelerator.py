"""The part of ``accelerate.Accelerator`` the trainer uses, written down as a contract.

``lowmcgm estimate`` drives the real trainer on fake CUDA tensors through a stand-in accelerator
(``memory.training_trace``), because a real ``Accelerator`` puts itself on the CPU there. Both must
satisfy ``AcceleratorLike``; a test checks that they do, so a new accelerator call in the trainer
fails a test rather than a user's estimate.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class AcceleratorLike(Protocol):
    """What ``trainer``, ``resume`` and the training previews call on their accelerator."""

    device: torch.device
    mixed_precision: str  # "no" | "fp16" | "bf16"
    process_index: int
    num_processes: int
    is_main_process: bool

    def autocast(self) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> Any: ...

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...

    def wait_for_everyone(self) -> None: ...


# Every attribute and method of the protocol, for the contract test (a Protocol's own annotations
# and methods, without typing's machinery).
ACCELERATOR_MEMBERS = tuple(sorted(
    set(AcceleratorLike.__annotations__)
    | {name for name, value in vars(AcceleratorLike).items() if callable(value) and not name.startswith("_")}))
