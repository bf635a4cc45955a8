"""The configuration's schema: one frozen dataclass per section of the TOML, and the ``Config``
that holds them. Each field declares itself once (``_f``): its default, help text, choices,
bounds and, where a command offers one, the flag that sets it; CLI flags, ``lowmcgm config-keys``
and validation (``validation.py``) read them from the field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from lowmcgm.limits import (MAX_GRAD_NORM, MAX_GUIDANCE_SCALE, MAX_LEARNING_RATE, MAX_LORA_RANK, MAX_LOSS_WEIGHT,
                            MAX_POSE_GUIDANCE_STRENGTH, MAX_RESOLUTION_PX, MAX_SEED, MAX_STEPS)
from lowmcgm.models.dtypes import DTYPE_NAMES


def _f(default: Any, help: str, *, choices: tuple[str, ...] = (), flag: str = "",
       bounds: tuple[float, float] | None = None, at_least: float | None = None,
       at_most: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A config field with its metadata.

    Args:
        choices: the values allowed; '' among them means "unset" (the help says what it stands for).
        flag: the CLI flag that sets this field, where a command offers one (``--steps``).
        bounds: inclusive (lowest, highest) of a number, said as one range ("between 1 and 1000").
        at_least, at_most: one-sided inclusive limits, each said on its own ("must be >= 0",
            "must be positive" for at least 1, "must be at most 2048").
        above, below: exclusive limits ("must be > 0", "must be below 1"), where the limit itself
            is refused (AdamW's betas lie in [0, 1)).

    Raises:
        TypeError: a sequence default that is not a tuple; two lower limits (of ``bounds``,
            ``at_least``, ``above``) or two upper ones (of ``bounds``, ``at_most``, ``below``):
            validation says one limit per side, so the other would go unchecked.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    sides = {"lower": {"bounds": bounds, "at_least": at_least, "above": above},
             "upper": {"bounds": bounds, "at_most": at_most, "below": below}}
    for side, limits in sides.items():
        names = [name for name, limit in limits.items() if limit is not None]
        if len(names) > 1:
            raise TypeError(f"one {side} limit per field, not {' and '.join(names)}")
    metadata = {"help": help, "choices": tuple(choices), "flag": flag, "bounds": bounds, "at_least": at_least,
                "at_most": at_most, "above": above, "below": below}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    base_model: str = _f("tiny", "diffusers folder, cached hub id, single .safetensors file, 'tiny' or 'toy'",
                         flag="--base-model")
    single_file_config: str = _f("auto", "config for single-file checkpoints: auto, sd15, sd21-base, sd21-768 or "
                                         "sdxl-base", choices=("auto", "sd15", "sd21-base", "sd21-768", "sdxl-base"))
    mixed_precision: str = _f("fp16", "dtype of frozen weights and autocast: 'no' (fp32), 'fp16' or 'bf16'",
                              choices=("no", "fp16", "bf16"))
    # Upper limits of numbers that size an allocation or a generator: limits.py says where they come from.
    resolution: int = _f(0, "training resolution in pixels; 0 takes the model's own", flag="--resolution",
                         at_least=0, at_most=MAX_RESOLUTION_PX)
    use_xformers: bool = _f(False, "use xformers for self-attention when installed (else SDPA)")
    use_gradient_checkpointing: bool = _f(True, "recompute UNet activations in backward to save memory")
    use_vae_offload: bool = _f(True, "move the VAE off the GPU once the photo is encoded")
    fp8_base: bool = _f(False, "store the frozen UNet weights in fp8 (float8_e4m3fn) with a per-tensor scale "
                               "(max |w| / 448, as OneTrainer's), each layer cast up to the mixed precision while "
                               "it computes: half their memory (SDXL: 4.8 -> 2.4 GiB), about 2.6 % rounding error")
    text_encoder_checkpointing: bool = _f(False, "recompute the text encoders' activations in backward while the "
                                                 "handles train through them (SDXL's two encoders at 77 tokens: "
                                                 "little memory, a second encoder forward per step)")
    fp8_text_encoders: bool = _f(False, "store the frozen text-encoder weights in fp8 as fp8_base does the UNet's "
                                        "(SDXL: 1.5 -> 0.8 GiB); needs text_encoder_checkpointing, without which "
                                        "backward keeps every layer's upcast copy")


@dataclass(frozen=True)
class DataConfig:
    image: str = _f("", "the photo (PNG or JPEG)", flag="--image")
    masks: tuple[str, ...] = _f((), "one mask file per concept, in handle order", flag="--mask")
    handles: tuple[str, ...] = _f((), "handle names, e.g. '<mydog>'; default <asset0>, <asset1>, ...", flag="--handle")
    init_words: tuple[str, ...] = _f((), "one initializer word per concept (optional)", flag="--init-word")
    background: str = _f("keep", "'keep' the photo's background, or 'solid': random colour outside the masks",
                         choices=("keep", "solid"))
    flip_p: float = _f(0.5, "probability of flipping image and masks together", bounds=(0.0, 1.0))
    # At most 8: phase 2 may encode every ordered subset of the concepts once, 109,600 prompts for 8.
    max_concepts: int = _f(4, "most concepts a run accepts (the paper reports failures past 3)", at_least=1,
                           at_most=8)
    # Mask-aware training (issue 12; off = the paper's recipe; docs/method.md, "Mask-aware training"):
    # the encoder only ever sees the source masks and their flips.
    use_affine_augmentation: bool = _f(
        False, "move photo and masks together by a random shift, scale and rotation each step, subjects "
               "kept in frame, so handles and mask encoder see the subjects at many places and sizes")
    affine_shift: float = _f(0.15, "largest random shift, as a fraction of the image side (before the "
                                   "shift is clamped to keep the selected subjects in frame)", bounds=(0.0, 0.5))
    affine_scale_min: float = _f(0.8, "smallest random scale of the affine augmentation (1 = unchanged)", above=0.0,
                                 at_most=1.0)
    affine_scale_max: float = _f(1.2, "largest random scale of the affine augmentation (lowered when the "
                                      "selected subjects would not fit in frame)", bounds=(1.0, 2.0))
    affine_rotate_deg: float = _f(10.0, "largest random rotation of the affine augmentation, in degrees",
                                  bounds=(0.0, 45.0))
    mask_dropout: float = _f(0.0, "probability that a selected concept's mask token is made from the blank "
                                  "(all-zero) mask, so a blank mask comes to mean 'no pose given' (issue: "
                                  "~0.15); the losses still use the real mask", bounds=(0.0, 1.0))
    use_mask_perturbation: bool = _f(
        False, "feed the mask encoder a roughened mask (random dilate/erode, then a coarse blocky redraw) "
               "so a rough hand-drawn pose reads like the training masks; the losses use the real mask")
    mask_perturbation: float = _f(0.05, "strength of the mask perturbation: the largest boundary move, as a "
                                        "fraction of the mask side", bounds=(0.0, 0.25))


@dataclass(frozen=True)
class LossConfig:
    attn_weight: float = _f(0.01, "weight of the cross-attention loss (Break-a-scene)", at_least=0,
                              at_most=MAX_LOSS_WEIGHT)
    mask_attn_weight: float = _f(0.3, "lambda_m: weight of the mask-token attention loss inside the attention term",
                                 at_least=0, at_most=MAX_LOSS_WEIGHT)
    prior_weight: float = _f(1.0, "weight of the prior-preservation loss", at_least=0,
                               at_most=MAX_LOSS_WEIGHT)
    attn_loss_downscale: int = _f(
        0, "attention maps are read at latent side / this (paper: 4); 0 derives it from the model: "
           "the cross-attention level whose maps are closest to 16x16, which is 4 for SD at 512 and 768 px",
        at_least=0, at_most=MAX_RESOLUTION_PX // 8)  # the latent side at the largest resolution
    use_mask_tokens: bool = _f(True, "append mask tokens to the text tokens (MCGM); off = Break-a-scene")
    mask_encoder_input: str = _f(
        "binary", "what the mask encoder's Linear reads: 'binary' (the paper: the 0/1 mask) or "
                  "'area_normalized' (the mask divided by its pixel count, so AdamW moves a mask token "
                  "about lr per step, like a handle, instead of lr times the mask's area)",
        choices=("binary", "area_normalized"))
    mask_token_norm: str = _f(
        "none", "'none' (the paper) or 'layernorm': a LayerNorm on each mask token with a learned gain "
                "initialised to the RMS of the handles' text-encoder states, so mask tokens start on the "
                "text tokens' scale and cannot grow past it by step size alone",
        choices=("none", "layernorm"))
    use_attention_loss: bool = _f(
        True, "the cross-attention and mask-attention terms; off = no capture processors (plain SDPA "
              "everywhere) and a diffusion-only loss, as a baseline for speed and memory")


@dataclass(frozen=True)
class LoraConfig:
    phase2_mode: str = _f("lora", "'lora' (LoRA adapters) or 'full' (fine-tune all UNet and text-encoder weights)",
                          choices=("lora", "full"))
    rank: int = _f(4, "LoRA rank", at_least=1, at_most=MAX_LORA_RANK)
    alpha: float = _f(4.0, "LoRA alpha (strength = alpha / rank)", above=0.0,
                      at_most=float(MAX_LORA_RANK))
    unet_targets: tuple[str, ...] = _f(
        ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
        "UNet module names that get LoRA (attention and feed-forward linears)",
    )
    use_text_encoder_lora: bool = _f(False, "also put LoRA on the text encoder")
    text_encoder_targets: tuple[str, ...] = _f(
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "text-encoder module names that get LoRA"
    )
    init_lora: str = _f("", "start phase 2 from this kohya or diffusers LoRA file")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = _f(0, "seed of every random draw", at_least=0, at_most=MAX_SEED)
    phase1_steps: int = _f(400, "steps of phase 1 (handles + mask encoder)", at_least=0, at_most=MAX_STEPS)
    phase2_steps: int = _f(400, "steps of phase 2 (adds LoRA)", at_least=0, at_most=MAX_STEPS)
    batch_size: int = _f(1, "samples per step", at_least=1, at_most=1024)
    handle_lr: float = _f(5e-4, "phase 1 learning rate of the handle embeddings", at_least=0, at_most=MAX_LEARNING_RATE)
    mask_encoder_lr: float = _f(5e-4, "phase 1 learning rate of the mask encoder",
                                at_least=0, at_most=MAX_LEARNING_RATE)
    phase2_handle_lr: float = _f(2e-6, "phase 2 learning rate of the handle embeddings",
                                 at_least=0, at_most=MAX_LEARNING_RATE)
    phase2_mask_encoder_lr: float = _f(1e-5, "phase 2 learning rate of the mask encoder",
                                       at_least=0, at_most=MAX_LEARNING_RATE)
    lora_lr: float = _f(1e-4, "phase 2 learning rate of the UNet LoRA (or of all UNet weights in 'full' mode)",
                        at_least=0, at_most=MAX_LEARNING_RATE)
    text_encoder_lr: float = _f(1e-5, "phase 2 learning rate of the text-encoder LoRA (or weights in 'full' mode)",
                                at_least=0, at_most=MAX_LEARNING_RATE)
    optimizer: str = _f("adamw8bit", "'adamw8bit' (bitsandbytes) or 'adamw' (torch)", choices=("adamw8bit", "adamw"))
    use_adamw_fallback: bool = _f(True, "when train.optimizer = 'adamw8bit' cannot run here (no CUDA device, or "
                                        "bitsandbytes fails a test step at set-up), train with torch AdamW instead "
                                        "(up to 4x the optimizer memory); false: refuse to start")
    adam_beta1: float = _f(0.9, "AdamW beta1", at_least=0, below=1)  # torch and bitsandbytes refuse 1
    adam_beta2: float = _f(0.999, "AdamW beta2", at_least=0, below=1)
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay", at_least=0, at_most=1.0)  # each step shrinks by lr x this
    adam_epsilon: float = _f(1e-8, "AdamW epsilon", at_least=0, at_most=1.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm", at_least=0, at_most=MAX_GRAD_NORM)
    checkpoint_every: int = _f(100, "write a resume checkpoint every N steps (0: only at the end and on Ctrl-C)",
                               at_least=0, at_most=MAX_STEPS)
    use_prior_preservation: bool = _f(False, "add an unmasked loss on class images")
    class_prompt: str = _f("a photo at the beach", "prompt of the class images")
    class_images_dir: str = _f("", "folder of class images; empty: generate them with the base model")
    num_class_images: int = _f(100, "class images to use or generate", at_least=0, at_most=100_000)


@dataclass(frozen=True)
class OutputConfig:
    out: str = _f("", "output folder", flag="--out")
    artifact_name: str = _f("lowmcgm.safetensors", "file name of the artifact inside the output folder")
    save_dtype: str = _f("fp16", "dtype of the weights in the artifact: 'fp16', 'bf16' or 'fp32'", choices=DTYPE_NAMES)
    preview_every: int = _f(100, "lowmcgm run: a preview sample and attention picture before training and every N "
                                 "steps of each phase (0: only before training)", flag="--preview-every", at_least=0,
                       at_most=MAX_STEPS)


@dataclass(frozen=True)
class SampleSettings:
    """How to sample (``lowmcgm sample``, ``run``, training previews): the ``[sample]`` section.

    Named as the sampler named it before it became a section: library callers build it directly,
    and ``samples.json`` stores it as the ``settings`` the images were drawn with.
    """

    # Bounds are checked before anything is allocated: a batch is allocated at once; steps past the
    # schedulers' 1000 training timesteps repeat timesteps; 10000 images fill a disk with PNGs.
    num_images: int = _f(4, "images per prompt", flag="--num-images", bounds=(1, 10_000))
    seed: int = _f(0, "image i of each prompt uses seed + i", flag="--seed")
    steps: int = _f(30, "denoising steps", flag="--steps", bounds=(1, 1000))
    guidance_scale: float = _f(7.5, "classifier-free guidance scale", flag="--guidance-scale", at_least=0,
                               at_most=MAX_GUIDANCE_SCALE)
    # The names of sampling.pipeline.SCHEDULERS (a test holds them equal: the factories need diffusers).
    scheduler: str = _f("dpmpp_2m", "denoising scheduler", choices=("ddim", "euler_a", "dpmpp_2m"),
                        flag="--scheduler")
    negative_prompt: str = _f("", "what to steer away from (empty: nothing)", flag="--negative-prompt")
    height: int = _f(0, "image height in pixels; 0: the resolution the artifact was trained at", flag="--height")
    width: int = _f(0, "image width in pixels; 0: the resolution the artifact was trained at", flag="--width")
    batch_size: int = _f(1, "images per denoising batch", flag="--batch-size", bounds=(1, 256))
    dtype: str = _f("", "dtype of the sampling weights; empty (the default): fp16 on a CUDA GPU, fp32 on the CPU "
                        "(half precision is ~100x slower there)", choices=("", *DTYPE_NAMES), flag="--dtype")
    use_mask_tokens: bool = _f(True, "append mask tokens after the text tokens (MCGM); false, or --no-mask: "
                                     "append none (plain Break-a-scene sampling)", flag="--no-mask")
    # latent drew the target poses best in the pose benchmark (docs/benchmarks.md); it changes
    # nothing where no pose is given. The modes are pose_guidance.py's.
    pose_guidance: str = _f(
        "latent", "pose guidance: pull each posed handle into its pose mask through cross-attention; attention "
                  "biases its logits (almost free), latent steps the latent along an attention energy (a UNet "
                  "backward per guided step); none turns it off", choices=("none", "attention", "latent"),
        flag="--guidance")
    # 0 stands for pose_guidance.DEFAULT_STRENGTH of the mode's rule (sampler.resolve_guidance writes it out).
    pose_guidance_strength: float = _f(0.0, "pose guidance strength; 0 takes the default of the mode's rule",
                                       flag="--guidance-strength", at_least=0, at_most=MAX_POSE_GUIDANCE_STRENGTH)
    pose_guidance_steps: int = _f(0, "denoising steps guided; 0: the first half", flag="--guidance-steps")
    # How each mode guides (pose_guidance.py): the published methods' rules, and lowmcgm's first
    # ones, kept where the pose benchmark measured them against each other (docs/benchmarks.md).
    pose_guidance_step: str = _f(
        "normalized", "latent guidance's step: noise-scaled (Chen et al. 2023: the energy per layer, head and "
                      "subject, a gradient step of strength x the noise level, none once a subject sits in its "
                      "mask) or normalized (a step of strength hundredths of the latent's RMS, fading out)",
        choices=("noise-scaled", "normalized"), flag="--guidance-step")
    pose_guidance_layers: str = _f(
        "loss", "cross-attention layers latent guidance reads: loss (the level the attention loss reads, down and "
                "up blocks), down (that level's down blocks only: its pass ends there, the cheapest) or mid-up (the "
                "mid block and the up blocks of that level, as layout-guidance)",
        choices=("loss", "down", "mid-up"), flag="--guidance-layers")
    pose_guidance_iterations: int = _f(1, "latent guidance: gradient steps per guided denoising step, while the "
                                          "energy is above --guidance-threshold", flag="--guidance-iterations",
                                       bounds=(1, 20))
    pose_guidance_threshold: float = _f(0.0, "latent guidance: an image whose energy is at or below this is not "
                                             "moved (0: always moved)", flag="--guidance-threshold", bounds=(0, 1))
    pose_guidance_separation: float = _f(0.0, "latent guidance (noise-scaled): weight of the term that keeps each "
                                              "subject's attention out of the other subjects' masks",
                                         flag="--guidance-separation", bounds=(0, 100))
    pose_guidance_presence: float = _f(0.0, "latent guidance (either step), two or more posed subjects: weight of "
                                            "BoxDiff's inner-box term, which makes each subject win the top fifth "
                                            "of its own mask's pixels from the others (so none is lost)",
                                       flag="--guidance-presence", bounds=(0, 100))
    pose_guidance_area_normalized: bool = _f(False, "latent guidance (noise-scaled): each subject's energy measured "
                                                    "from what attention spread evenly would score, so a large mask "
                                                    "does not decide the step", flag="--guidance-area-normalized")
    pose_guidance_bias: str = _f(
        "fixed", "attention guidance's logit change: dense (DenseDiffusion: toward the query's largest logit "
                 "inside the mask and its smallest outside, scaled by the mask's area, fading with the noise "
                 "level) or fixed (+strength inside, -strength outside, fading out)",
        choices=("dense", "fixed"), flag="--guidance-bias")
    pose_guidance_self_attention: float = _f(
        0.0, "attention guidance (dense): the same change on self-attention, where query and key lie in one "
             "subject's mask (DenseDiffusion uses 0.3); 0: off", flag="--guidance-self-attention", bounds=(0, 10))
    use_vae_slicing: bool = _f(False, "decode a batch one image at a time (less memory)", flag="--vae-slicing")
    use_vae_tiling: bool = _f(False, "decode in tiles (large images, less memory)", flag="--vae-tiling")
    use_cpu_offload: bool = _f(False, "keep models on the CPU and move each to the GPU while it runs (4-6 GB "
                                      "cards)", flag="--cpu-offload")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleSettings = field(default_factory=SampleSettings)


def section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``train.lora_lr``."""
    keys = []
    for section, cls in section_types().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def config_field(key: str) -> tuple[dataclasses.Field, Any]:
    """The field of a dotted key and its type (a real type: annotations here are strings)."""
    section, name = key.split(".", 1)
    cls = section_types()[section]
    return next(f for f in dataclasses.fields(cls) if f.name == name), typing.get_type_hints(cls)[name]


def field_help(key: str) -> str:
    return config_field(key)[0].metadata["help"]


def field_flag(key: str) -> str:
    """The CLI flag that sets ``key`` (``--steps`` for ``sample.steps``), or ''."""
    return config_field(key)[0].metadata["flag"]


# Every key that takes one of fixed values -> those values, as its field declares them (read, never
# declared, here): the one table for callers that list a key's choices.
CHOICES = {key: choices for key in all_keys() if (choices := config_field(key)[0].metadata["choices"])}
