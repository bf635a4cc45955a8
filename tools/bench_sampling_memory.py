"""Peak GPU memory of sampling per pose-guidance mode (SD 1.5 at 512 px by default), traced on fake
CUDA tensors with lowmcgm's own guidance code (``lowmcgm.memory.sampling``): no GPU, no weights.

    OMP_NUM_THREADS=1 python tools/bench_sampling_memory.py [--model sd15] [--resolution 512] [--dtype fp16] [--fp8-unet]
        [--guidance-checkpointing family|on|off]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.memory.sampling import MODES, estimate_sampling  # noqa: E402

GiB = 2**30


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", help="a shipped config name (sd15, sd21-base, sd21-768, sdxl-base)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--fp8-unet", action="store_true", help="the UNet stored in fp8 (artifacts trained with "
                                                           "model.fp8_base, e.g. preset sdxl-8gb)")
    p.add_argument("--guidance-checkpointing", default="family", choices=("family", "on", "off"),
                   help="latent guidance's UNet pass with gradient checkpointing or not; family (default): as "
                        "lowmcgm samples, the model family's choice (SDXL on, SD 1.x/2.x off)")
    args = p.parse_args(argv)
    checkpointing = {"family": None, "on": True, "off": False}[args.guidance_checkpointing]
    rows = [estimate_sampling(args.model, args.resolution, mode, args.dtype, fp8_unet=args.fp8_unet,
                              guidance_checkpointing=checkpointing)["result"] for mode in MODES]
    none = rows[0]["peak_bytes"]
    print("| pose guidance | weights | text encoders (while encoding) | denoising step (above weights) | "
          "VAE decode (above weights) | peak | x none |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['weights_bytes'] / GiB:.2f} GiB | {r['text_encoders_bytes'] / GiB:.2f} GiB | "
              f"{r['step_peak_bytes'] / GiB:.2f} GiB | {r['decode_peak_bytes'] / GiB:.2f} GiB | "
              f"{r['peak_bytes'] / GiB:.2f} GiB | {r['peak_bytes'] / none:.2f} |")
    return rows


if __name__ == "__main__":
    main()
