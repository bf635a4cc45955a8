"""Training: the two-phase loop (``trainer``), its batches, checkpoints and resume, the phase-2
set-up, prior preservation, previews, the optimizer choice and the accelerator."""
