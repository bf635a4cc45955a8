"""The two-phase protocol: what each phase trains, built in one place (``enter_phase``).

Training, resume, the memory estimate's tracer, the FLOP count and ``tools/bench_speed.py`` all
begin a phase here, so "phase 1, then phase 2's adapters, then a new optimizer (with the text
encoder offloaded when it has nothing left to train)" is written once.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from lowmcgm.config import Config
from lowmcgm.data import build_prompt
from lowmcgm.models.text_conditioning import encode_prompt_ids, tokenize_prompts
from lowmcgm.training.optimizer import optimizer_class
from lowmcgm.training.state import Setup, TextCache, TrainState, say_info


def enter_phase(setup: Setup, phase: int, generator: torch.Generator | None = None,
                history: list | None = None, weights: dict[str, torch.Tensor] | None = None) -> TrainState:
    """Begin ``phase`` with a fresh optimizer: the one place phase 2 is built.

    Phase 1 trains the handles and the mask encoder against the unchanged model; phase 2 adds its
    adapters first (LoRA arrives only then, as in Break-a-scene). ``weights`` (a checkpoint's
    ``MCGMState.state_dict``, on resume) are loaded once the adapters are there, and before the text
    encoder's outputs are cached: the cache must encode the trained handles, not their start.

    Args:
        generator: the batch generator to go on with; a new one seeded from ``train.seed``.
        history: the loss history so far.
        weights: trained weights to load (resume), or None to go on with those on the base.
    """
    if phase == 2:
        add_phase2_adapters(setup)
    if weights is not None:
        setup.mcgm.load_state_dict(setup.base, weights)
    text_cache = offload_text_encoder(setup) if text_encoder_is_frozen(setup.cfg, phase) else None
    if generator is None:
        generator = torch.Generator().manual_seed(setup.cfg.train.seed + setup.accelerator.process_index)
    return TrainState(phase, 0, build_optimizer(setup, phase), generator, history or [], text_cache)


def add_phase2_adapters(setup: Setup) -> None:
    """Phase 2's trainables on the base (LoRA, or every weight in ``full`` mode), optionally
    started from ``lora.init_lora``; nothing when phase 2 has no steps."""
    cfg = setup.cfg
    if not cfg.train.phase2_steps:
        return
    setup.mcgm.add_adapters(setup.base, cfg.lora, setup.device)
    if cfg.lora.init_lora:
        from lowmcgm.interop.lora_import import load_init_lora

        load_init_lora(setup, Path(cfg.lora.init_lora))


def text_encoder_is_frozen(cfg: Config, phase: int) -> bool:
    """Phase 2 with frozen handles and no text-encoder adapter: the text encoder only computes."""
    return (phase == 2 and cfg.train.phase2_handle_lr == 0 and not cfg.lora.use_text_encoder_lora
            and cfg.lora.phase2_mode == "lora")


@torch.no_grad()
def offload_text_encoder(setup: Setup) -> TextCache:
    """Encode every prompt training can draw once, move the text encoder off the GPU, and return
    the encodings by token ids (``TrainState.text_cache``).

    Union sampling draws ordered subsets of the N handles: sum over k of N!/(N-k)! prompts (64 for
    N = 4), a few MB of outputs against the text encoder's 0.25-0.7 GB.
    """
    n = setup.concept.num_concepts
    prompts = [build_prompt([setup.mcgm.handle_names[i] for i in order])
               for k in range(1, n + 1) for order in itertools.permutations(range(n), k)]
    if setup.cfg.train.use_prior_preservation:
        prompts.append(setup.cfg.train.class_prompt)
    ids = tokenize_prompts(setup.base, prompts)
    states = encode_prompt_ids(setup.base, ids, setup.device).split()
    for encoder in setup.base.text_encoders:
        encoder.to("cpu")
    say_info(setup, f"Phase 2 trains nothing in the text encoder: {len(prompts)} prompts encoded once, "
                    "text encoder moved off the GPU.")
    return {ids.key(row): state for row, state in enumerate(states)}


def build_optimizer(setup: Setup, phase: int) -> torch.optim.Optimizer:
    t = setup.cfg.train
    groups = setup.mcgm.parameter_groups(phase, t)
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    optimizer_cls = optimizer_class(setup.optimizer_name)  # chosen (8-bit tested) by choose_optimizer
    return setup.accelerator.prepare_optimizer(optimizer_cls(groups, **kwargs))
