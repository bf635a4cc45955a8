"""Peak GPU memory of kohya-ss/sd-scripts' SDXL LoRA trainer (``sdxl_train_network.py``), traced on the
same fake-CUDA tracer as ``lowmcgm estimate``, for ``tools/bench_memory_sdxl.py``.

As :mod:`lowmcgm.memory.peers` does for SD 1.x: the checkout's path is given by the caller, none of
kohya's code is copied here, and what runs is kohya's own code: its argument parser and defaults
(``sdxl_train_network.setup_parser``, ``train_util.verify_training_args``,
``sdxl_train_util.verify_sdxl_training_args``), its ``SdxlNetworkTrainer`` (``load_target_model``
after the checkpoint is read: the SDPA switch ``replace_unet_modules`` and the VAE's attention
setting; ``cache_text_encoder_outputs_if_needed``, which moves the U-Net and VAE to the CPU, the two
text encoders to the device in fp16, encodes under autocast and sends them back to the CPU in fp32;
the noise scheduler; ``process_batch``, ``get_noise_pred_and_target`` and ``call_unet``: the size
embeddings, the forward pass and the loss), its SDXL text-encoding strategy (``encode_tokens``, with
its pooled-output workaround), its latent-caching strategy (``cache_batch_latents``), its own SDXL
U-Net class (``library/sdxl_original_unet.py``, built with its SDXL-base defaults) with its gradient
checkpointing, its LoRA network (``networks/lora.py``: ``create_network``, ``apply_to``,
``prepare_optimizer_params``) and ``train_util.get_optimizer`` (bitsandbytes' ``AdamW8bit``, run under
the trace: its state is counted, not computed by formula).

What is re-created here, and why (``train()`` needs image files, a dataset config, tokenizer
downloads, a real ``accelerate.Accelerator``, and saves the network; none of that runs on fake tensors):

- ``train()``'s order (:func:`kohya_sdxl_step`, with ``train_network.py``'s line numbers): models
  loaded on the CPU, latents cached with the VAE alone on the device then the VAE sent to the CPU,
  text-encoder outputs cached, network created and applied, checkpointing on, U-Net cast (fp16, or
  fp8 with ``--fp8_base``) and frozen, U-Net and network moved to the device, and the loop body:
  ``process_batch``, backward, ``clip_grad_norm_``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``.
- Model loading: ``sdxl_train_util.load_target_model`` reads a checkpoint; it is replaced for the
  call by a function that builds kohya's U-Net class on the meta device and the text encoders
  (``CLIPTextModel``, ``CLIPTextModelWithProjection``) and VAE from lowmcgm's shipped ``sdxl-base``
  configs (the sizes kohya's ``sdxl_model_util`` hard-codes), then gives each fake CPU tensors in
  fp32 (kohya loads in fp32 on the CPU with ``--mixed_precision`` and no ``--full_fp16``).
- Latent caching: ``load_images_and_masks_for_caching`` (image files, torchvision) is replaced for
  the call by one 1024 px random image; kohya's ``cache_batch_latents`` runs on it.
- Text-encoder caching: the dataset's ``new_cache_text_encoder_outputs`` is re-created as what
  ``SdxlTextEncoderOutputsCachingStrategy.cache_batch_outputs`` does without its ``.numpy()`` (fake
  tensors hold no data): tokenize the caption, ``encode_tokens`` under ``no_grad``, keep the outputs
  on the CPU. The tokenizers (kohya downloads both) are lowmcgm's offline SDXL ones (same vocabulary
  and length; the second pads with id 0 as kohya sets it).
- The network is moved to the device before the optimizer is built (kohya builds it first and lets
  ``accelerator.prepare`` move the parameters in place; fake parameters are replaced instead, so the
  optimizer must see the replacements). Same tensors, same bytes.
- The batch: what kohya's collator gives with cached latents and text-encoder outputs (latents, the
  two hidden states and the pooled output in fp32, ``original_sizes_hw``, ``crop_top_lefts``,
  ``target_sizes_hw``, loss weights), on the device as accelerate's data loader puts it.
- The accelerator (:class:`_SdxlAccelerator`, peers' with ``prepare`` as a move to the device):
  fp16 loss scaling and accelerate's fp32 cast of the U-Net's output are not modelled (an in-place
  unscale; one latent-sized tensor).
- ``assert_extra_args``'s dataset checks (bucket steps, caption options) need a dataset: only its
  argument checks run.

Import shims: peers' (:func:`~lowmcgm.memory.peers.install_import_shims`); SDXL needs no other.
This module imports torch; the traced functions run inside :func:`lowmcgm.memory.trace.run_traced`.
"""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

from lowmcgm.errors import UserError
from lowmcgm.memory import trace as mt
from lowmcgm.memory.peers import (CAPTION, KOHYA_REQUIRED, STEPS, KohyaAccelerator, check_kohya_checkout,
                                  install_import_shims, run_kohya_steps)
from lowmcgm.memory.step_probe import peak_parts

# kohya's documented low-VRAM settings for SDXL LoRA, with their sources in the checkout (48d368fa):
# - docs/train_SDXL-en.md, "Tips for SDXL training": "The LoRA training can be done with 8GB GPU
#   memory (10GB recommended). For reducing the GPU memory usage, the following options are
#   recommended: Train U-Net only. Use gradient checkpointing. Use `--cache_text_encoder_outputs`
#   option and caching latents. Use one of 8bit optimizers or Adafactor optimizer. Use lower dim
#   (4 to 8 for 8GB GPU)."
# - docs/sdxl_train_network.md: the example command (--network_module=networks.lora
#   --optimizer_type="AdamW8bit" --mixed_precision="bf16" --gradient_checkpointing
#   --cache_text_encoder_outputs --cache_latents); "--cache_text_encoder_outputs ... LoRA modules for
#   Text Encoder cannot be trained (`--network_train_unet_only` must be specified)"; "For SDXL, `bf16`
#   or `fp16` is recommended"; "When using `fp16`, it is recommended to run the VAE in `float32` with
#   `--no_half_vae`". fp16 (lowmcgm's SDXL presets' precision; bf16 takes the same bytes).
# - docs/train_network_advanced.md, "2. Other Tips", VRAM: "`--fp8_base` / `--fp8_base_unet`
#   (experimental)" (the second variant; lowmcgm's sdxl-8gb and sdxl-6gb keep the frozen UNet in
#   fp8), and "`sdpa` or `xformers` are generally recommended" for attention.
SDXL_DOC_FLAGS = (
    "--network_module=networks.lora",
    "--network_train_unet_only",
    "--cache_text_encoder_outputs",
    "--cache_latents",
    "--gradient_checkpointing",
    "--mixed_precision=fp16",
    "--no_half_vae",
    "--optimizer_type=AdamW8bit",
    "--sdpa",
    "--train_batch_size=1",
    "--network_alpha=1",
)
SDXL_RESOLUTION = 1024
# (rank, --fp8_base): lowmcgm's sdxl-8gb/sdxl-6gb rank (32) and the docs' "4 to 8 for 8GB GPU".
SDXL_VARIANTS = ((32, False), (32, True), (8, False), (8, True))
_SDXL_FILES = ("sdxl_train_network.py", "library/sdxl_original_unet.py", "library/sdxl_train_util.py",
               "library/strategy_sdxl.py")


def sdxl_flags(rank: int, fp8_base: bool = False, resolution: int = SDXL_RESOLUTION) -> list[str]:
    """The command line traced for kohya's SDXL trainer: the documented settings with ``rank``,
    ``--fp8_base`` when asked and ``resolution`` (square)."""
    return [*SDXL_DOC_FLAGS, *(["--fp8_base"] if fp8_base else []), f"--network_dim={rank}",
            f"--resolution={resolution}", *KOHYA_REQUIRED]


def check_variants(variants: Any) -> list[tuple[int, bool]]:
    """``variants`` as (rank, fp8_base) pairs.

    Raises:
        ValueError: empty, or a pair whose rank is not a positive integer or whose flag is not a bool.
    """
    out = []
    for v in variants:
        rank, fp8 = v
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or not isinstance(fp8, bool):
            raise ValueError(f"a kohya SDXL variant is (rank > 0, fp8_base: bool), not {v!r}")
        out.append((rank, fp8))
    if not out:
        raise ValueError("no kohya SDXL variant to trace")
    return out


def check_kohya_sdxl_checkout(path: str | Path) -> Path:
    """The kohya-ss/sd-scripts checkout at ``path``, checked for the SD and SDXL files the trace runs.

    Raises:
        UserError: a missing folder or file, naming it.
    """
    root = check_kohya_checkout(path)
    missing = [f for f in _SDXL_FILES if not (root / f).is_file()]
    if missing:
        raise UserError(f"--kohya '{root}' has no SDXL trainer: {', '.join(missing)} missing; use a "
                        "kohya-ss/sd-scripts checkout with sdxl_train_network.py (commit 48d368fa was traced).")
    return root


# ------------------------------------------------------------------------------ traced side


class _SdxlAccelerator(KohyaAccelerator):
    """peers' accelerator, with what the SDXL setup also calls."""

    process_index = 0

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)  # accelerate's device placement

    def wait_for_everyone(self) -> None:
        return None


class _CaptionDataset:
    """The dataset's text-encoder caching for one caption (module docstring: re-created)."""

    def __init__(self, tokenize_strategy: Any, text_encoding_strategy: Any, batch_size: int):
        self.tokenize_strategy, self.encoding = tokenize_strategy, text_encoding_strategy
        self.batch_size = batch_size
        self.outputs: list[torch.Tensor] = []

    def new_cache_text_encoder_outputs(self, models: list[Any], accelerator: Any) -> None:
        tokens1, tokens2 = self.tokenize_strategy.tokenize([CAPTION] * self.batch_size)
        with torch.no_grad():
            outs = self.encoding.encode_tokens(self.tokenize_strategy, models, [tokens1, tokens2])
        self.outputs = [t.cpu() for t in outs]  # kohya: .cpu().numpy(), one per image


def _import_kohya_sdxl(root: str) -> dict[str, Any]:
    if root not in sys.path:
        sys.path.insert(0, root)
    notes = install_import_shims()
    mods = {name: importlib.import_module(name) for name in
            ("sdxl_train_network", "library.train_util", "library.sdxl_train_util", "library.sdxl_original_unet",
             "library.strategy_sdxl", "networks.lora")}
    mods["notes"] = list(notes)
    return mods


def _on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """Fake fp32 CPU tensors for a meta module (kohya's checkpoint, loaded on the CPU)."""
    mt.materialize_fake(module, lambda n, p: torch.float32)
    return module.to("cpu")


def kohya_sdxl_step(kohya: str, rank: int = 32, fp8_base: bool = False, resolution: int = SDXL_RESOLUTION,
                    steps: int = STEPS) -> dict[str, Any]:
    """Traceable: kohya's ``sdxl_train_network.py`` setup and ``steps`` training steps on SDXL base.

    Returns:
        Bytes relative to the start: ``setup_peak_bytes`` (the larger of ``latent_caching_peak_bytes``,
        the VAE alone on the device, and ``text_encoder_caching_peak_bytes``), ``peak_bytes`` (the
        steps) and its ``parts`` (:func:`~lowmcgm.memory.step_probe.peak_parts`), with parameter
        counts, the optimizer class, the flags and the import shims' notes.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lowmcgm.models.configs import SHIPPED_CONFIGS
    from lowmcgm.models.tokenizer import build_sd_tokenizer

    s = mt.session()
    mods = _import_kohya_sdxl(kohya)
    sdxl_train_network, train_util = mods["sdxl_train_network"], mods["library.train_util"]
    flags = sdxl_flags(rank, fp8_base, resolution)
    args = sdxl_train_network.setup_parser().parse_args(flags)
    train_util.verify_training_args(args)
    train_util.prepare_dataset_args(args, True)
    mods["library.sdxl_train_util"].verify_sdxl_training_args(args)  # assert_extra_args (sdxl_train_network.py l.32-41)
    assert args.network_train_unet_only or not args.cache_text_encoder_outputs
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    weight_dtype, _ = train_util.prepare_dtype(args)  # fp16
    vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
    acc = _SdxlAccelerator(s.device, args.mixed_precision)
    batch_size = args.train_batch_size

    # load_target_model (l.602): kohya's own method, its checkpoint reading replaced (docstring).
    folder = SHIPPED_CONFIGS["sdxl-base"]

    def load_from_configs(*_: Any) -> tuple:
        with torch.device("meta"):
            unet = mods["library.sdxl_original_unet"].SdxlUNet2DConditionModel()
        te1 = mt.build_from_config(CLIPTextModel, folder / "text_encoder")
        te2 = mt.build_from_config(CLIPTextModelWithProjection, folder / "text_encoder_2")
        vae = mt.build_from_config(AutoencoderKL, folder / "vae")
        return (True, *(_on_cpu(m) for m in (te1, te2, vae, unet)), None, None)

    with mock.patch.object(mods["library.sdxl_train_util"], "load_target_model", load_from_configs):
        _, text_encoders, vae, unet = trainer.load_target_model(args, weight_dtype, acc)
    gc.collect()
    baseline = s.counter.current  # nothing on the device yet
    s.reset_peak()

    # --cache_latents (l.611-621): the VAE alone on the device encodes the image, then goes to the CPU.
    vae.to(acc.device, dtype=vae_dtype)
    vae.requires_grad_(False)
    vae.eval()
    info = SimpleNamespace(latents=None)
    image = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1  # what the loader gives, on the CPU
    loaded = (image, [None] * batch_size, [(resolution, resolution)] * batch_size,
              [(0, 0, resolution, resolution)] * batch_size)
    with mock.patch.object(train_util, "load_images_and_masks_for_caching", lambda *a: loaded):
        trainer.get_latents_caching_strategy(args).cache_batch_latents(vae, [info], False, False, False)
    vae.to("cpu")
    gc.collect()
    latent_peak = s.counter.peak - baseline

    # cache_text_encoder_outputs_if_needed (l.633): kohya's own method; the text encoders end on the CPU.
    s.reset_peak()
    tokenize_strategy = object.__new__(mods["library.strategy_sdxl"].SdxlTokenizeStrategy)  # __init__ downloads
    tokenize_strategy.tokenizer1 = build_sd_tokenizer("sdxl-base")
    tokenize_strategy.tokenizer2 = build_sd_tokenizer("sdxl-base", "tokenizer_2")
    tokenize_strategy.tokenizer2.pad_token_id = 0  # as kohya's __init__
    tokenize_strategy.max_length = tokenize_strategy.tokenizer1.model_max_length  # --max_token_length None
    text_encoding_strategy = trainer.get_text_encoding_strategy(args)
    dataset = _CaptionDataset(tokenize_strategy, text_encoding_strategy, batch_size)
    trainer.cache_text_encoder_outputs_if_needed(args, acc, unet, vae, text_encoders, dataset, weight_dtype)
    gc.collect()
    te_peak = s.counter.peak - baseline

    # The network (l.665-727), created on the frozen models' shapes and applied to them.
    network = mods["networks.lora"].create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoders,
                                                   unet, neuron_dropout=args.network_dropout,
                                                   dropout=args.network_dropout)
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = trainer.is_train_text_encoder(args)
    network.apply_to(text_encoders, unet, train_text_encoder, train_unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        network.enable_gradient_checkpointing()

    # Casts and moves (l.827-902): U-Net fp16 or fp8, frozen; text encoders stay on the CPU in fp32.
    unet_weight_dtype = torch.float8_e4m3fn if (args.fp8_base or args.fp8_base_unet) else weight_dtype
    unet.requires_grad_(False)
    unet.to(dtype=unet_weight_dtype)
    for t_enc in text_encoders:
        t_enc.requires_grad_(False)
        assert t_enc.device.type == "cpu"  # l.856: no cast; never on the device again
    unet = acc.prepare(unet)  # prepare_unet_with_accelerator, l.881
    mt.materialize_fake(network, lambda n, p: torch.float32)  # accelerator.prepare(network), l.896

    # The optimizer (l.731-767), after the move (module docstring).
    te_lr = args.text_encoder_lr  # l.733-741: lora.py takes one text-encoder lr
    te_lr = te_lr[0] if isinstance(te_lr, (list, tuple)) and te_lr else (None if isinstance(te_lr, list) else te_lr)
    results = network.prepare_optimizer_params(te_lr, args.unet_lr, args.learning_rate)
    trainable_params = results[0] if isinstance(results, tuple) else results
    optimizer_name, _, optimizer = train_util.get_optimizer(args, trainable_params)
    if args.gradient_checkpointing:  # l.901
        unet.train()
        for t_enc in text_encoders:
            t_enc.train()
    network.prepare_grad_etc(text_encoders, unet)
    network.on_epoch_start(text_encoders, unet)
    noise_scheduler = trainer.get_noise_scheduler(args, s.device)

    # The collator's batch (train_util.py l.1786-1819) from the caches, on the device.
    lat_w, lat_h = info.latents_original_size
    left, top = info.latents_crop_ltrb[:2]
    target = (info.latents.shape[-2] * 8, info.latents.shape[-1] * 8)

    sizes = {key: torch.tensor([list(hw)] * batch_size, dtype=torch.long).to(s.device) for key, hw in
             (("original_sizes_hw", (lat_h, lat_w)), ("crop_top_lefts", (top, left)), ("target_sizes_hw", target))}
    batch = {"latents": torch.stack([info.latents] * batch_size).to(s.device), **sizes,
             "text_encoder_outputs_list": [t.float().to(s.device) for t in dataset.outputs], "input_ids_list": None,
             "loss_weights": torch.ones(batch_size).to(s.device), "captions": [CAPTION] * batch_size, "images": None,
             "alpha_masks": None, "custom_attributes": [{}] * batch_size, "flippeds": [False] * batch_size,
             "network_multipliers": torch.ones(batch_size).to(s.device)}
    del info, dataset
    probe, _ = run_kohya_steps(
        s, steps, optimizer, acc, network, args, None,
        lambda: trainer.process_batch(batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype,
                                      weight_dtype, acc, args, text_encoding_strategy, tokenize_strategy,
                                      is_train=True, train_text_encoder=train_text_encoder, train_unet=train_unet))
    peak = s.counter.peak - baseline
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    return {"rank": rank, "fp8_base": fp8_base, "peak_bytes": peak, "setup_peak_bytes": max(latent_peak, te_peak),
            "latent_caching_peak_bytes": latent_peak, "text_encoder_caching_peak_bytes": te_peak,
            **peak_parts(probe, peak, baseline, [unet, *text_encoders, vae, network], trainable, s.device.type),
            "trainable_params": sum(p.numel() for p in trainable),
            "lora_modules": len(network.unet_loras) + len(network.text_encoder_loras),
            "unet_weight_dtype": str(unet_weight_dtype).removeprefix("torch."),
            "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__} ({optimizer_name})",
            "flags": flags, "notes": mods["notes"]}


def kohya_sdxl_steps(kohya: str, variants: list[list[Any]], resolution: int = SDXL_RESOLUTION) -> list[dict[str, Any]]:
    """Traceable: :func:`kohya_sdxl_step` once per (rank, fp8_base), in order."""
    out = []
    for rank, fp8 in variants:
        out.append(kohya_sdxl_step(kohya, rank, fp8, resolution))
        gc.collect()
    return out


def trace_kohya_sdxl(kohya: str | Path, variants: Any = SDXL_VARIANTS, timeout_s: float = 3600.0,
                     resolution: int = SDXL_RESOLUTION) -> list[dict[str, Any]]:
    """:func:`kohya_sdxl_step` for each (rank, fp8_base) of ``variants``, in one tracing subprocess
    (kohya imports once).

    Raises:
        UserError: not a kohya checkout with the SDXL trainer.
        ValueError: a bad variant (:func:`check_variants`).
        RuntimeError: the trace failed (the child's traceback attached).
    """
    pairs = check_variants(variants)
    root = str(check_kohya_sdxl_checkout(kohya))
    try:
        out = mt.run_traced("lowmcgm.memory.kohya_sdxl:kohya_sdxl_steps",
                            {"kohya": root, "variants": [list(p) for p in pairs], "resolution": resolution},
                            timeout_s, mode="fake")
    except mt.TraceError as exc:
        raise RuntimeError(f"{exc}\n{exc.child_traceback or exc.stderr_tail}") from exc
    return out["result"]
