"""Rounding error of fp8 weight storage (``model.fp8_base``) per layer of a real UNet architecture,
with the per-tensor scale ``store_in_fp8`` keeps and with the plain cast it replaced.

The UNet is built from a shipped config on the meta device and one Linear or Conv2d at a time is
materialised on the CPU, so the whole model (SDXL: 2.6 B weights) is never held at once. Each weight
is drawn by its layer's own initialisation (torch's default, which diffusers' UNet keeps), or read
from ``--weights`` (a diffusers-named UNet ``.safetensors`` file, read one tensor at a time), cast
to fp16 as training casts it, then stored in fp8 as ``lowmcgm.adapters.store_in_fp8`` stores it
(``quantize_fp8``, read back by ``StoredInFp8``). Error is
relative to the fp16 weight: ||read back - w|| / ||w||; "zeroed" counts non-zero weights stored as 0.

    MALLOC_MMAP_THRESHOLD_=1048576 OMP_NUM_THREADS=1 python tools/bench_fp8_error.py [--model sdxl-base]
        [--weights unet.safetensors] [--seed 0] [--worst 8]

SDXL: several minutes of one core (a progress line every 100 layers goes to stderr) and 1.3 GB. The malloc setting keeps each weight's buffers out of
glibc's heap, which otherwise grows with the freed ones past 2.5 GB.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.adapters import StoredInFp8, quantize_fp8  # noqa: E402
from lowmcgm.memory.session import build_from_config  # noqa: E402
from lowmcgm.models.configs import SHIPPED_CONFIGS  # noqa: E402

# Layer types by name (diffusers' UNet2DConditionModel), first match wins; the order is the table's.
LAYER_TYPES = (
    ("attention q/k/v/out, self (attn1)", r"\.attn1\.to_"),
    ("attention q/k/v/out, cross (attn2)", r"\.attn2\.to_"),
    ("feed-forward (ff.net)", r"\.ff\.net\."),
    ("transformer proj_in / proj_out", r"\.proj_(in|out)$"),
    ("resnet conv 3x3 (conv1, conv2)", r"resnets\.\d+\.conv[12]$"),
    ("resnet shortcut 1x1", r"conv_shortcut$"),
    ("down/upsampler conv", r"(down|up)samplers\."),
    ("time / size embeddings", r"(time_embedding|add_embedding|time_emb_proj)"),
    ("conv_in / conv_out", r"^conv_(in|out)$"),
)
# The synthetic case: N(0, std) weights, one 1024 x 1024 matrix each.
SYNTHETIC_STDS = (0.02, 0.01, 0.005)
PROGRESS_EVERY = 100  # layers between progress lines (SDXL's UNet has about 800)


@dataclass
class Totals:
    """Sums over the layers of one type (or one layer)."""

    layers: int = 0
    weights: int = 0
    norm_sq: float = 0.0
    plain_err_sq: float = 0.0
    scaled_err_sq: float = 0.0
    plain_zeroed: int = 0
    scaled_zeroed: int = 0
    stds: list[float] = field(default_factory=list)

    def add(self, other: Totals) -> None:
        for name in ("layers", "weights", "norm_sq", "plain_err_sq", "scaled_err_sq", "plain_zeroed",
                     "scaled_zeroed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.stds += other.stds

    def errors(self) -> tuple[float, float, float, float]:
        """(plain error, plain zeroed, scaled error, scaled zeroed), as fractions."""
        norm = self.norm_sq ** 0.5
        return (self.plain_err_sq ** 0.5 / norm, self.plain_zeroed / self.weights,
                self.scaled_err_sq ** 0.5 / norm, self.scaled_zeroed / self.weights)


def measure(weight: torch.Tensor) -> Totals:
    """Store ``weight`` (fp16, as training casts it) in fp8 both ways and compare with it."""
    w = weight.detach().half().float()
    plain = w.half().to(torch.float8_e4m3fn).float()  # what model.fp8_base stored before the scale
    stored, scale = quantize_fp8(w.half())
    scaled = StoredInFp8(torch.float32, scale)(stored)  # as the model reads it
    nonzero = w != 0
    return Totals(layers=1, weights=w.numel(), norm_sq=float(w.square().sum()),
                  plain_err_sq=float((plain - w).square().sum()), scaled_err_sq=float((scaled - w).square().sum()),
                  plain_zeroed=int(((plain == 0) & nonzero).sum()), scaled_zeroed=int(((scaled == 0) & nonzero).sum()),
                  stds=[float(w.std())])


def layer_type(name: str) -> str:
    return next((label for label, pattern in LAYER_TYPES if re.search(pattern, name)), "other")


def iter_weights(unet: nn.Module, weights_file: str | None, seed: int):
    """(name, fp32 or fp16 weight) of each Linear and Conv2d, one materialised at a time."""
    torch.manual_seed(seed)
    reader = None
    if weights_file:
        from safetensors import safe_open

        reader = safe_open(weights_file, framework="pt")
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if reader is not None:
            yield name, reader.get_tensor(f"{name}.weight")
            continue
        module.to_empty(device="cpu")
        module.reset_parameters()  # the layer's own initialisation (diffusers' UNet keeps torch's)
        yield name, module.weight.detach()
        module.to_empty(device="meta")  # free it before the next one


def main(argv: list[str] | None = None) -> dict[str, Totals]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sdxl-base", help="a shipped config name (sd15, sd21-base, sd21-768, sdxl-base)")
    p.add_argument("--weights", default="", help="a diffusers-named UNet .safetensors file (e.g. a model folder's "
                                                 "unet/diffusion_pytorch_model.safetensors); default: initialised")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worst", type=int, default=8, help="worst layers listed")
    args = p.parse_args(argv)
    from diffusers import UNet2DConditionModel

    unet = build_from_config(UNet2DConditionModel, SHIPPED_CONFIGS[args.model] / "unet")
    by_type: dict[str, Totals] = {label: Totals() for label, _ in LAYER_TYPES}
    by_layer: dict[str, Totals] = {}
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
    started = time.perf_counter()
    for i, (name, weight) in enumerate(iter_weights(unet, args.weights or None, args.seed), 1):
        by_layer[name] = measure(weight)
        by_type.setdefault(layer_type(name), Totals()).add(by_layer[name])
        if i % PROGRESS_EVERY == 0 or i == n_layers:
            print(f"{i}/{n_layers} layers, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    total = Totals()
    for t in by_type.values():
        total.add(t)

    source = f"weights of {args.weights}" if args.weights else f"initialised weights (seed {args.seed})"
    print(f"{args.model} UNet, {source}: {total.layers} Linear/Conv2d layers, {total.weights / 1e9:.3f} B weights; "
          f"scales: {total.layers} x 4 B = {total.layers * 4 / 1024:.1f} KiB "
          f"({total.layers * 512 / 2**20:.2f} MiB at the CUDA allocator's 512 B per tensor)\n")
    print("| layer type | layers | weights | weight std (median) | plain cast: error | plain cast: zeroed | "
          "with scale: error | with scale: zeroed |")
    print("|---|---|---|---|---|---|---|---|")
    for label, t in [*by_type.items(), ("**all**", total)]:
        if not t.layers:
            continue
        plain_err, plain_zero, scaled_err, scaled_zero = t.errors()
        std = sorted(t.stds)[len(t.stds) // 2]
        print(f"| {label} | {t.layers} | {t.weights / 1e6:.1f} M | {std:.4f} | {plain_err:.1%} | {plain_zero:.1%} | "
              f"{scaled_err:.1%} | {scaled_zero:.2%} |")
    for std in SYNTHETIC_STDS:
        t = measure(torch.randn(1024, 1024, generator=torch.Generator().manual_seed(args.seed)) * std)
        plain_err, plain_zero, scaled_err, scaled_zero = t.errors()
        print(f"| synthetic N(0, {std}) | 1 | 1.0 M | {std:.4f} | {plain_err:.1%} | {plain_zero:.1%} | "
              f"{scaled_err:.1%} | {scaled_zero:.2%} |")
    for key, title in ((2, "with scale"), (0, "plain cast")):
        print(f"\nWorst {args.worst} layers, {title}:\n")
        print("| layer | weight std | plain cast: error | zeroed | with scale: error | zeroed |")
        print("|---|---|---|---|---|---|")
        worst = sorted(by_layer.items(), key=lambda item: item[1].errors()[key], reverse=True)[:args.worst]
        for name, t in worst:
            plain_err, plain_zero, scaled_err, scaled_zero = t.errors()
            print(f"| `{name}` | {t.stds[0]:.4f} | {plain_err:.1%} | {plain_zero:.1%} | {scaled_err:.1%} | "
                  f"{scaled_zero:.2%} |")
    return by_type


if __name__ == "__main__":
    main()
