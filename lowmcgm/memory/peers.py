"""Peak GPU memory of other trainers' own training steps, on the same fake-CUDA tracer as
``lowmcgm estimate``, for ``tools/bench_memory.py``'s side-by-side table.

kohya-ss/sd-scripts (``train_network.py``, LoRA on SD 1.x) is traced from a checkout whose path the
caller gives: it is not a dependency of lowmcgm and none of its code is copied here. What runs is
kohya's own code: its argument parser and defaults (``setup_parser``), its ``NetworkTrainer`` (noise
scheduler, text encoding, ``process_batch``: the forward pass and the loss), its own U-Net class
(``library/original_unet.py``) with its SDPA attention switch (``replace_unet_modules``) and
gradient checkpointing, its LoRA network (``networks/lora.py``: ``create_network``, ``apply_to``,
``prepare_optimizer_params``) and its optimizer factory (``train_util.get_optimizer``, which builds
bitsandbytes' ``AdamW8bit``; it runs under the trace as in ``training_trace.py``, so its state is counted,
not computed by formula).

What is re-created here, and why (``train()`` is one 1,400-line function that needs image files, a
dataset config, a Hugging Face tokenizer download, a real ``accelerate.Accelerator`` and saves the
network at its end; none of that can run on fake tensors):

- ``train()``'s order of setup (:func:`kohya_step`): models loaded, latents cached with the VAE alone
  on the device and the VAE sent back to the CPU (``--cache_latents``), text encoder moved to the
  device in fp16, network created and applied, checkpointing enabled, U-Net and text encoder cast
  to fp16 and frozen, network moved to the device in fp32 (``accelerator.prepare``), and its training
  loop body: ``process_batch``, backward, ``clip_grad_norm_`` over the network's parameters,
  ``optimizer.step()``, ``zero_grad(set_to_none=True)``. The line numbers are in comments.
- Model loading: kohya's ``load_target_model`` reads a checkpoint; here its U-Net class is built
  with SD 1.5's config (``sample_size 64, attention_head_dim 8, cross_attention_dim 768``, as
  ``_load_target_model`` passes them) and the text encoder and VAE from lowmcgm's shipped SD 1.5
  configs, on the meta device, then given fake tensors of the dtype each has in training.
- The network is moved to the device before the optimizer is built (kohya builds it first and lets
  ``accelerator.prepare`` move the parameters in place; fake parameters are replaced instead, so the
  optimizer must see the replacements). Same tensors, same bytes.
- The tokenizer: kohya's ``SdTokenizeStrategy`` downloads ``openai/clip-vit-large-patch14``; here
  its ``tokenize`` runs on lowmcgm's offline SD 1.x tokenizer (same vocabulary and length).
- The batch: what kohya's collator gives with cached latents (latents, one caption's token ids,
  loss weight 1), on the device.
- The accelerator (:class:`KohyaAccelerator`): under fake CUDA ``accelerate`` would put itself on
  the CPU; this one says CUDA and autocasts to fp16 as accelerate does. fp16 loss scaling is not
  modelled (an in-place unscale: no memory), as in ``training_trace.py``.

Import shims for libraries newer than the ones kohya pins (its ``requirements.txt``: transformers
4.54.1, diffusers 0.32.1, and torchvision through its install guide): ``transformers.CLIPFeatureExtractor`` (removed in transformers 5) is aliased
to ``CLIPImageProcessor`` for kohya's ``lpw_stable_diffusion`` import; when torchvision is missing
(no CPU build of it on the package index for this torch), a stub stands for
``torchvision.transforms``, which kohya uses only to load images, never in the traced step.
transformers 5 also flattened ``CLIPTextModel`` (no ``.text_model``): the model is given a plain
attribute ``text_model`` pointing to itself, for kohya's checkpointing workaround
(``text_model.embeddings.requires_grad_(True)``). kohya's other import-time needs (toml, voluptuous,
opencv, imagesize, einops) must be installed.

This module imports torch; the traced functions run inside :func:`lowmcgm.memory.trace.run_traced`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lowmcgm.errors import UserError
from lowmcgm.memory import trace as mt
from lowmcgm.memory.saved_activations import SavedActivations
from lowmcgm.memory.step_probe import StepProbe, optimizer_state_bytes, peak_parts

GiB = 2**30

# kohya's documented low-VRAM LoRA settings for SD 1.x, with their sources in the checkout:
# - docs/train_network.md, "3. Running the Training", the basic command line:
#   --network_module=networks.lora --network_dim=16 --network_alpha=1 --optimizer_type="AdamW8bit"
#   --sdpa --mixed_precision="fp16" --gradient_checkpointing
# - docs/train_README-ja.md, "--full_fp16" section: "To minimise memory use, give the xformers,
#   use_8bit_adam, cache_latents and gradient_checkpointing options and set train_batch_size to 1"
#   (メモリ使用量を最小化するためには、xformers、use_8bit_adam、cache_latents、
#   gradient_checkpointingの各オプションを指定し、train_batch_sizeを1としてください). SDPA stands for xformers: the same
#   memory-efficient kernel family, and xformers has no CPU build to import here.
# - docs/train_network_README-ja.md's example adds --cache_latents and says it runs "just barely
#   even with 8GB VRAM" (8GB VRAMでもぎりぎり動作するようです).
KOHYA_DOC_FLAGS = (
    "--network_module=networks.lora",
    "--network_alpha=1",
    "--optimizer_type=AdamW8bit",
    "--sdpa",
    "--mixed_precision=fp16",
    "--gradient_checkpointing",
    "--cache_latents",
    "--train_batch_size=1",
)
KOHYA_DOC_RANK = 16  # docs/train_network.md's --network_dim=16
# What kohya's parser requires that does not change memory.
KOHYA_REQUIRED = ("--pretrained_model_name_or_path=unused.safetensors", "--output_dir=unused",
                   "--output_name=unused")
# SD 1.5's U-Net arguments as kohya's _load_target_model passes them from a diffusers config.
SD15_KOHYA_UNET = dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768,
                       use_linear_projection=False, upcast_attention=False)
STEPS = 2  # as training_trace.py: the first step creates the optimizer state, the second runs with it
CAPTION = "a photo of sks dog"


def kohya_flags(rank: int, resolution: int = 512, batch_size: int = 1) -> list[str]:
    """The command line traced for kohya: the documented settings with ``rank`` and ``resolution``
    (and ``--train_batch_size``, after the documented 1, when ``batch_size`` differs: the last wins)."""
    batch = [f"--train_batch_size={batch_size}"] if batch_size != 1 else []
    return [*KOHYA_DOC_FLAGS, *batch, f"--network_dim={rank}", f"--resolution={resolution}", *KOHYA_REQUIRED]


def check_kohya_checkout(path: str | Path) -> Path:
    """The kohya-ss/sd-scripts checkout at ``path``, checked for the files the trace runs.

    Raises:
        UserError: a missing folder or file, naming it.
    """
    root = Path(path).expanduser().resolve()
    missing = [f for f in ("train_network.py", "networks/lora.py", "library/original_unet.py",
                           "library/train_util.py") if not (root / f).is_file()]
    if missing:
        raise UserError(f"--kohya '{root}' is not a kohya-ss/sd-scripts checkout: {', '.join(missing)} "
                        "missing; clone https://github.com/kohya-ss/sd-scripts and pass its folder.")
    return root


# --------------------------------------------------------------------------------- table rows


@dataclass(frozen=True)
class Figures:
    """One traced configuration, in bytes: each phase's step peak, the setup peak, the highest."""

    label: str
    settings: str
    step_peaks: tuple[int, ...]  # one per phase (kohya: one)
    setup_peak: int

    @property
    def highest(self) -> int:
        return max(*self.step_peaks, self.setup_peak)


def comparison_rows(ours: list[Figures], peers: list[Figures]) -> list[list[str]]:
    """Markdown table cells: every configuration (peers first) with its figures in GiB and the ratio
    of its highest figure to each peer's highest figure ("-" on a peer's own row).

    Returns:
        One list of cells per configuration: label, settings, step peaks ("a / b" per phase), setup,
        highest, then one ratio per peer.
    """
    rows = []
    for fig in [*peers, *ours]:
        cells = [fig.label, fig.settings, " / ".join(f"{p / GiB:.2f}" for p in fig.step_peaks),
                 f"{fig.setup_peak / GiB:.2f}", f"{fig.highest / GiB:.2f}"]
        cells += ["-" if peer is fig else f"{fig.highest / peer.highest:.2f}" for peer in peers]
        rows.append(cells)
    return rows


# ------------------------------------------------------------------------------ traced side


def install_import_shims() -> list[str]:
    """Let kohya's modules import against the libraries installed here (module docstring)."""
    notes = []
    import diffusers  # noqa: F401  (before any torchvision stub: diffusers probes for torchvision)
    import transformers

    if "CLIPFeatureExtractor" not in dir(transformers):
        cls = transformers.CLIPImageProcessor
        # Resolving a lazy attribute can replace the module object in sys.modules: set it there.
        sys.modules["transformers"].CLIPFeatureExtractor = cls
        notes.append("transformers.CLIPFeatureExtractor aliased to CLIPImageProcessor (removed in transformers 5)")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001  (absent, or a GPU build that fails to load its ops)
        sys.modules.pop("torchvision", None)
        tv = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")

        class _NotInTheStep:  # kohya builds IMAGE_TRANSFORMS at import; calling it loads images
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("torchvision stub: image loading is not part of the traced step")

        transforms.Compose = transforms.ToTensor = transforms.Normalize = _NotInTheStep
        transforms.functional = functional
        tv.transforms = transforms
        sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional})
        notes.append("torchvision stubbed (kohya uses it to load images only)")
    return notes


class KohyaAccelerator:
    """What kohya's step uses of ``accelerate.Accelerator``, on the trace's device (fp16 autocast)."""

    def __init__(self, device: torch.device, mixed_precision: str):
        self.device = device
        self.mixed_precision = mixed_precision
        self.sync_gradients = True
        self.is_main_process = True
        self.num_processes = 1
        self.probe: StepProbe | None = None

    def autocast(self) -> Any:
        if self.probe is not None:
            self.probe.forward_begins()
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.probe is not None:
            self.probe.forward_done()
        loss.backward()
        if self.probe is not None:
            self.probe.backward_done()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def print(self, *args: Any) -> None:
        return None


def _import_kohya(root: str) -> dict[str, Any]:
    if root not in sys.path:
        sys.path.insert(0, root)
    notes = install_import_shims()
    mods = {name: importlib.import_module(name) for name in
            ("train_network", "library.train_util", "library.original_unet", "library.strategy_sd",
             "networks.lora")}
    mods["notes"] = list(notes)
    return mods


def kohya_step(kohya: str, rank: int = 8, resolution: int = 512, steps: int = STEPS,
               batch_size: int = 1, saved: bool = False) -> dict[str, Any]:
    """Traceable: kohya's ``train_network.py`` setup and ``steps`` training steps on SD 1.5.

    Args:
        kohya: the sd-scripts checkout (see :func:`check_kohya_checkout`).
        rank: ``--network_dim``.
        resolution: ``--resolution`` (square).
        steps: training steps (the second has optimizer state).
        batch_size: images per step (``--train_batch_size``; one caption for all).
        saved: also return ``saved_by_module``, what the last step's forward saved for backward by
            module (:class:`~lowmcgm.memory.saved_activations.SavedActivations`).

    Returns:
        Bytes relative to the start: ``setup_peak_bytes`` (latent caching, VAE alone on the device),
        ``peak_bytes`` (the steps) and its ``parts`` (:func:`~lowmcgm.memory.step_probe.peak_parts`, the
        rule lowmcgm's estimate itemises by), with parameter counts, the optimizer class and the flags.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from lowmcgm.models.configs import SHIPPED_CONFIGS
    from lowmcgm.models.tokenizer import build_sd_tokenizer

    s = mt.session()
    mods = _import_kohya(kohya)
    train_network, train_util = mods["train_network"], mods["library.train_util"]
    flags = kohya_flags(rank, resolution, batch_size)
    args = train_network.setup_parser().parse_args(flags)
    train_util.verify_training_args(args)
    train_util.prepare_dataset_args(args, True)
    trainer = train_network.NetworkTrainer()
    weight_dtype, _ = train_util.prepare_dtype(args)  # fp16
    vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
    acc = KohyaAccelerator(s.device, args.mixed_precision)
    gc.collect()
    baseline = s.counter.current
    s.reset_peak()

    # Stand-in for load_target_model (train_network.py l.179): kohya's own U-Net class, with SDPA.
    folder = SHIPPED_CONFIGS["sd15"]
    with torch.device("meta"):
        unet = mods["library.original_unet"].UNet2DConditionModel(**SD15_KOHYA_UNET)
    text_encoder = mt.build_from_config(CLIPTextModel, folder / "text_encoder")
    if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel.text_model
        object.__setattr__(text_encoder, "text_model", text_encoder)  # a plain attribute, not a child
        mods["notes"].append("CLIPTextModel.text_model set to the model itself (flattened in transformers 5)")
    vae = mt.build_from_config(AutoencoderKL, folder / "vae")
    train_util.replace_unet_modules(unet, args.mem_eff_attn, args.xformers, args.sdpa)

    # --cache_latents (l.588): the VAE alone on the device encodes the image, then goes to the CPU.
    mt.materialize_fake(vae, lambda n, p: vae_dtype)
    vae.requires_grad_(False)
    vae.eval()
    image = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1  # what the dataset loads, on the CPU
    with torch.no_grad():
        latents = trainer.encode_images_to_latents(args, vae, image.to(s.device, dtype=vae_dtype)).to("cpu")
    vae.to("cpu")
    gc.collect()
    setup_peak = s.counter.peak - baseline

    # cache_text_encoder_outputs_if_needed (l.224): the text encoder goes to the device in fp16.
    tokenize_strategy = object.__new__(mods["library.strategy_sd"].SdTokenizeStrategy)
    tokenize_strategy.tokenizer = build_sd_tokenizer("sd15")
    tokenize_strategy.max_length = tokenize_strategy.tokenizer.model_max_length  # --max_token_length None
    text_encoding_strategy = trainer.get_text_encoding_strategy(args)

    # The network (l.652-711), created on the frozen models' shapes and applied to them.
    network = mods["networks.lora"].create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder,
                                                   unet, neuron_dropout=args.network_dropout,
                                                   dropout=args.network_dropout)
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = trainer.is_train_text_encoder(args)
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    if args.gradient_checkpointing:  # l.717
        unet.enable_gradient_checkpointing()
        if train_text_encoder and text_encoder.supports_gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
        network.enable_gradient_checkpointing()

    # Casts and moves (l.843-902): frozen U-Net and text encoder in fp16, the network in fp32.
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    mt.materialize_fake(unet, lambda n, p: weight_dtype)
    mt.materialize_fake(text_encoder, lambda n, p: weight_dtype)
    mt.materialize_fake(network, lambda n, p: torch.float32)

    # The optimizer (l.737-761), after the move (module docstring).
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        results = network.prepare_optimizer_params_with_multiple_te_lrs(args.text_encoder_lr, args.unet_lr,
                                                                        args.learning_rate)
    else:
        results = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    trainable_params = results[0] if isinstance(results, tuple) else results
    optimizer_name, _, optimizer = train_util.get_optimizer(args, trainable_params)
    if args.gradient_checkpointing:  # l.908
        unet.train()
        text_encoder.train()
        if train_text_encoder:
            trainer.prepare_text_encoder_grad_ckpt_workaround(0, text_encoder)
    network.prepare_grad_etc(text_encoder, unet)
    network.on_epoch_start(text_encoder, unet)
    noise_scheduler = trainer.get_noise_scheduler(args, s.device)

    input_ids = tokenize_strategy.tokenize(CAPTION)[0]  # the collator stacks one per image
    batch = {"latents": latents, "input_ids_list": [input_ids[None].expand(batch_size, *input_ids.shape).to(s.device)],
             "loss_weights": torch.ones(batch_size, device=s.device), "captions": [CAPTION] * batch_size,
             "images": None}
    params = list(network.parameters())
    roots = {"unet": unet, "text_encoder": text_encoder} if saved else None
    probe, saved_by_module = run_kohya_steps(
        s, steps, optimizer, acc, network, args, roots,
        lambda: trainer.process_batch(batch, [text_encoder], unet, network, vae, noise_scheduler, vae_dtype,
                                      weight_dtype, acc, args, text_encoding_strategy, tokenize_strategy,
                                      is_train=True, train_text_encoder=train_text_encoder, train_unet=train_unet))
    peak = s.counter.peak - baseline
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    # Gradients the optimizer never clears: kohya's checkpointing workaround makes the text encoder's
    # embeddings require grad (l.908 above), so their gradient stays between steps.
    ids = {id(p) for p in trainable}
    stray = [p.grad for m in (unet, text_encoder) for p in m.parameters() if p.grad is not None and id(p) not in ids]
    return {"peak_bytes": peak, "setup_peak_bytes": setup_peak,
            "gradients_outside_the_optimizer_bytes": mt.storage_bytes(stray),
            **peak_parts(probe, peak, baseline, [unet, text_encoder, vae, network], trainable, s.device.type),
            "trainable_params": sum(p.numel() for p in params),
            "lora_modules": len(network.unet_loras) + len(network.text_encoder_loras),
            "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__} ({optimizer_name})",
            "flags": flags, "notes": mods["notes"], **({"saved_by_module": saved_by_module} if saved else {})}


def run_kohya_steps(s: Any, steps: int, optimizer: Any, acc: "KohyaAccelerator", network: Any, args: Any,
                    saved_roots: dict[str, torch.nn.Module] | None, process_batch: Callable[[], torch.Tensor]
                    ) -> tuple[StepProbe, dict[str, int]]:
    """kohya's loop body (train_network.py l.1415-1459) ``steps`` times, followed by a :class:`StepProbe`.

    Args:
        s: the tracing session (its counter and device).
        process_batch: ``trainer.process_batch`` with the step's arguments; returns the loss.
        saved_roots: the models whose saved activations to itemise (by module), or None.

    Returns:
        The closed probe, and what the last step's forward saved for backward by module ({} without
        ``saved_roots``).
    """
    probe = StepProbe(s.counter, [p for group in optimizer.param_groups for p in group["params"]])
    acc.probe = probe
    hooks = probe.watch_optimizer(optimizer)
    gc.collect()
    s.reset_peak()
    by_module: dict[str, int] = {}
    for _ in range(steps):
        probe.begin_step(optimizer_state_bytes(optimizer, s.device.type))
        watch = SavedActivations(saved_roots, s.device.type) if saved_roots else None
        with probe, (watch if watch is not None else contextlib.nullcontext()):
            loss = process_batch()
            if watch is not None:
                watch.recording = False  # a reentrant checkpoint's recompute saves again
            acc.backward(loss)
            del loss
            if args.max_grad_norm != 0.0:
                acc.clip_grad_norm_(network.get_trainable_params(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        probe.enter("between steps")
        by_module = dict(watch.by_module) if watch is not None else {}
    for hook in hooks:
        hook.remove()
    probe.close()
    return probe, by_module


def trace_kohya(kohya: str | Path, settings: list[tuple[int, int]], resolution: int = 512, *,
                saved: tuple[int, int] | None = None, timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """:func:`kohya_step` for each (rank, batch size) of ``settings``, in one tracing subprocess
    (kohya imports once); the one equal to ``saved`` also itemises what it saves for backward.

    Raises:
        UserError: not a kohya checkout.
        RuntimeError: the trace failed (the child's traceback attached): for instance an import of
            kohya's that the installed libraries no longer provide.
    """
    root = str(check_kohya_checkout(kohya))
    try:
        out = mt.run_traced("lowmcgm.memory.peers:kohya_steps",
                            {"kohya": root, "settings": [list(x) for x in settings], "resolution": resolution,
                             "saved": list(saved) if saved else None}, timeout_s, mode="fake")
    except mt.TraceError as exc:
        raise RuntimeError(f"{exc}\n{exc.child_traceback or exc.stderr_tail}") from exc
    return out["result"]


def kohya_steps(kohya: str, settings: list[list[int]], resolution: int = 512,
                saved: list[int] | None = None) -> list[dict[str, Any]]:
    """Traceable: :func:`kohya_step` once per (rank, batch size), in order."""
    out = []
    for rank, batch in settings:
        out.append(kohya_step(kohya, rank, resolution, batch_size=batch, saved=[rank, batch] == saved))
        gc.collect()
    return out
