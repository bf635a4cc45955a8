"""Bounds on every size that comes from outside (config, flags, image headers, artifact metadata).

Each is checked before anything is allocated from it, so a typo or a stranger's file fails in a
second with one line instead of growing to many GB first.
"""

from __future__ import annotations

from pathlib import Path

from lowmcgm.errors import UserError

# SD 1.x trains at 512 px, SD 2.x at 768; 2048 is twice the largest size any SD 1.x/2.x UNet was
# tuned for, far past what a 4-12 GB card trains, and still a bounded allocation (a 2048 px latent
# batch is ~64 MiB).
MAX_RESOLUTION_PX = 2048
# Photos and masks: 64 megapixels (a 9248 x 6936 phone photo is 64 MP). Pillow's own bomb guard
# only warns up to 89 MP and refuses at 179 MP; we refuse with a message well before either.
MAX_IMAGE_PIXELS = 64 * 2**20
# Artifact metadata: text widths of SD 1.x/2.x are 768 and 1024 (SDXL's concatenated width is 2048).
MAX_TEXT_WIDTH = 8192
# The mask encoder reads masks at 16 x 16 (mask_encoder.MASK_SIZE); 1024 keeps its weight bounded.
MAX_MASK_SIZE = 1024
# LoRA ranks past the text width are meaningless; the largest shipped preset uses 64.
MAX_LORA_RANK = 4096
# Seeds: torch.Generator.manual_seed takes 64 bits; sample adds the image index, train the process index.
MAX_SEED = 2**63 - 1
# Step counts (train.phase1_steps, phase2_steps, checkpoint and preview intervals): the paper trains
# 400 + 400; a million steps is weeks on a GPU, and past it a typo (an extra digit or ten) trains for ever.
MAX_STEPS = 1_000_000
# Learning rates: AdamW moves each weight by about lr per step; past 1 it moves weights of size ~1
# (handles, LoRA) by more than their size every step. Presets use 2e-6 to 5e-3.
MAX_LEARNING_RATE = 1.0
# Loss weights: the defaults are 0.01 to 1; 10,000 times the diffusion loss drowns it at any precision.
MAX_LOSS_WEIGHT = 1e4
# The gradient clipping norm: the default is 1, as in diffusers' and kohya's trainers; 10,000 (the
# loss weights' limit, chosen on its own) is far above any norm worth clipping at, so more is a typo.
MAX_GRAD_NORM = 1e4
# Classifier-free guidance scale: A1111's slider ends at 30; past 100 every image saturates.
MAX_GUIDANCE_SCALE = 100.0
# Pose guidance strength: the rules' defaults are 1 to 30 (pose_guidance.DEFAULT_STRENGTH).
MAX_POSE_GUIDANCE_STRENGTH = 1000.0
# estimate --card: the largest accelerator sold has 192 GB (MI300X); 1024 leaves room for what comes.
MAX_CARD_GB = 1024

# Text files a command reads whole (--prompts, --config, a preset): a 10,000-prompt file is ~1 MiB.
# Reading stops one byte past this, so /dev/zero or a FIFO that never ends fails in a second
# instead of filling memory.
MAX_TEXT_FILE_BYTES = 4 * 2**20


def read_text_file(path: str | Path, what: str) -> str:
    """Read a UTF-8 text file of at most ``MAX_TEXT_FILE_BYTES``.

    Args:
        what: how the message names the file ("Prompts file", "Config file").

    Raises:
        UserError: the file is larger (or endless). ``OSError`` and ``UnicodeDecodeError`` are
            left to the caller, which names them for its file.
    """
    with open(path, "rb") as fh:
        data = fh.read(MAX_TEXT_FILE_BYTES + 1)
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise UserError(f"{what} {path} is larger than {MAX_TEXT_FILE_BYTES // 2**20} MiB (or has no end): "
                        "pass a text file of settings or prompts.")
    return data.decode("utf-8")
