#!/usr/bin/env bash
# One GPU lease (about 15 minutes of device time, one call): continue the toy base model's UNet on
# the GPU with a large batch, export and evaluate it, then measure training memory for real. What
# matters comes back under $OUT: eval.json, sheet.png, model.tar (the exported fp16 model folder),
# unet-fp16.safetensors (the checkpoint to continue from, halved to fit the 16 MiB file limit),
# train.log, memory.json, sdxl-8gb.log and sdxl-6gb.log (tiny SDXL steps with fp8 and 8-bit AdamW).
#
# Here, once per session that has a lease (downloads the wheels the device lacks into .whl/ and
# puts the checkpoints to continue from in runs/toy_gpu/):
#     bash tools/gpu_session.sh --prepare [UNET_CHECKPOINT] [VAE_CHECKPOINT]
#     (defaults: tools/toy_checkpoints/unet.safetensors, ../shared/toy-checkpoints/vae.safetensors)
# Then one device call, carrying .whl and runs/toy_gpu, with a timeout that leaves room to rerun:
#     bash tools/gpu_session.sh                                  # MINUTES=7 BATCH=256 by default
# Back here: tar xf model.tar into a run folder, compare eval.json with docs/benchmarks.md's
# learning curve, and continue on the CPU from unet-fp16.safetensors (tools/train_toy_base.py
# reads fp16 checkpoints). The CPU path is tested with PY=.venv/bin/python DEVICE=cpu MINUTES=0.05
# BATCH=2 SKIP_MEMORY=1 (SKIP_SDXL=1 leaves out the SDXL step, which takes ~2 min on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/toy_gpu}
if [[ "${1:-}" == "--prepare" ]]; then
    unet=${2:-tools/toy_checkpoints/unet.safetensors}
    vae=${3:-../shared/toy-checkpoints/vae.safetensors}
    mkdir -p .whl "$RUN/checkpoints"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata bitsandbytes==0.50.2
    cp "$unet" "$RUN/checkpoints/unet.safetensors"
    cp "$vae" "$RUN/checkpoints/vae.safetensors"
    du -sh .whl "$RUN"
    exit 0
fi

MINUTES=${MINUTES:-7}
PY=${PY:-python3}
BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
[[ -f "$RUN/checkpoints/unet.safetensors" ]] || { echo "no checkpoint in $RUN: run --prepare first"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt" || true

# The small architecture (the one the bundled weights and the learning curve use), a GPU-sized batch.
"$PY" tools/train_toy_base.py --stage unet --preset small --batch "$BATCH" --out "$RUN" \
    --max-minutes "$MINUTES" --checkpoint-every 200 --log-every 50 --device "$DEVICE" 2>&1 | tee "$OUT/train.log"
"$PY" - "$RUN/checkpoints/unet.safetensors" "$OUT/unet-fp16.safetensors" <<'EOF'
import sys
from safetensors import safe_open
from safetensors.torch import save_file
with safe_open(sys.argv[1], "pt") as f:
    meta = f.metadata()
    tensors = {k: f.get_tensor(k).half() if f.get_tensor(k).is_floating_point() else f.get_tensor(k) for k in f.keys()}
save_file(tensors, sys.argv[2], metadata=meta)
EOF
tar cf "$OUT/model.tar" -C "$RUN" model
"$PY" tools/eval_toy_base.py --model "$RUN/model" --device "$DEVICE" --out "$OUT/eval.json" \
    --sheet "$OUT/sheet.png" > /dev/null
"$PY" -c "import json; r = json.load(open('$OUT/eval.json')); print({k: r.get(k) for k in ('background_acc', 'kind_acc', 'plain_background_acc', 'plain_kind_acc', 'pose_corr', 'psnr_db')})"
# Issues 22 and 27: one tiny SDXL training step of each phase on CUDA as sdxl-8gb and sdxl-6gb train
# (the frozen UNet, and for sdxl-6gb the checkpointed text encoders, stored in fp8 with their scales;
# bitsandbytes' 8-bit AdamW from .whl, checked by its one-step probe before it is trusted).
# sdxl-8gb.log and sdxl-6gb.log say which optimizer ran and whether the steps finished.
if [[ -z "${SKIP_SDXL:-}" ]]; then
    for preset in sdxl-8gb sdxl-6gb; do
        timeout 300 "$PY" -c 'import sys; from lowmcgm.cli import main; sys.exit(main(sys.argv[1:]))' train \
            --preset "$preset" --base-model tiny-xl --set model.resolution=64 \
            --set train.phase1_steps=1 --set train.phase2_steps=1 --image examples/dogcat/photo.png \
            --mask examples/dogcat/dog.png --mask examples/dogcat/cat.png --init-word dog --init-word cat \
            --out "$OUT/$preset" 2>&1 | tee "$OUT/$preset.log" || true
        rm -rf "$OUT/$preset/checkpoints"  # the log and the artifact are what matter
    done
fi
if [[ -z "${SKIP_MEMORY:-}" ]]; then
    # bitsandbytes is not on the device: presets that ask for 8-bit AdamW measure torch AdamW there.
    timeout 240 "$PY" tools/bench_memory.py --measure --json "$OUT/memory.json" 2>&1 | tail -40 || true
fi
