"""The trained state of one run: handles, mask encoder and adapters, installed on a base model.

Split as peft splits its LoRA: the configuration lives in ``config`` (``LoraConfig``,
``TrainConfig``), the layers in their own modules (``HandleEmbedding`` in ``handles``,
``MaskEncoder`` in ``mask_encoder``, peft's LoRA layers through ``adapters``), and ``MCGMState`` is
the model-level object that puts them on a base model and owns what trains: the parameter groups,
``state_dict``/``load_state_dict`` (checkpoints), the artifact in both directions, and removing
itself again. The trainer, resume, sampler, previews and export all go through it, so a new
trainable tensor is added here once.

Example::

    state = MCGMState.install(base, ["<asset0>"], ["dog"], use_mask_tokens=True, seed=0)
    state.add_adapters(base, cfg.lora, device)     # phase 2: LoRA arrives after phase 1
    artifact = state.to_artifact(base, run_meta)
    state.remove(base)                              # the base computes as loaded again
    state = MCGMState.from_artifact(base, artifact) # e.g. to sample on the same loaded base
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lowmcgm.adapters import add_lora, load_lora_state_dict, lora_state_dict
from lowmcgm.artifact import SDXL_POOLING, SDXL_POOLING_KEY, Artifact, vectors_key
from lowmcgm.config import LoraConfig, TrainConfig
from lowmcgm.errors import UserError
from lowmcgm.handles import HandleEmbedding, add_handle_tokens, install_handles
from lowmcgm.mask_encoder import MaskEncoder
from lowmcgm.models.base import BaseModel

@dataclass
class MCGMState:
    """Handles, mask encoder and phase-2 weights of one run, live on a base model.

    Attributes:
        handle_names: the handles, in mask order (``<asset0>``, ...).
        handle_sets: per text encoder (SDXL has two), the embedding wrapper whose ``vectors``
            (K, d) are its rows of the handles; all train together. ``handles`` is the first.
        mask_encoder: None when trained without mask tokens (Break-a-scene mode).
        lora: the adapters' description as the artifact records it (``mode``, ``rank``, ``alpha``,
            ``unet_targets``, ``text_encoder_targets``); empty until ``add_adapters``.
        unet_params, text_encoder_params: the phase-2 trainables (LoRA weights, or every weight
            in ``full`` mode); empty before ``add_adapters``.
    """

    handle_names: list[str]
    handle_sets: list[HandleEmbedding]
    mask_encoder: MaskEncoder | None
    lora: dict[str, Any] = field(default_factory=dict)
    unet_params: list[nn.Parameter] = field(default_factory=list)
    text_encoder_params: list[nn.Parameter] = field(default_factory=list)

    @property
    def handles(self) -> HandleEmbedding:
        """The first text encoder's handles: their token ids are where the losses read attention."""
        return self.handle_sets[0]

    # ------------------------------------------------------------------------------------------
    # Installing and removing.

    @classmethod
    def install(cls, base: BaseModel, handle_names: list[str], init_words: list[str],
                use_mask_tokens: bool, seed: int, device: torch.device | str = "cpu",
                mask_encoder_input: str = "binary", mask_token_norm: str = "none") -> MCGMState:
        """Add the handles (initialised from their words) and a fresh mask encoder to ``base``.

        The base's own weights are frozen first: only what this state adds will train.
        ``mask_encoder_input`` and ``mask_token_norm`` are ``MaskEncoder``'s ``input_mode`` and
        ``output_norm`` (config ``loss.*``); a LayerNorm's gain is set by the trainer
        (``MaskEncoder.init_output_scale``), which runs the text encoder.
        """
        for module in (base.unet, *base.text_encoders, base.vae):
            module.requires_grad_(False)
        init_gen = torch.Generator().manual_seed(seed)
        # The same handles in every text encoder, each initialised from that encoder's own table.
        handle_sets = [install_handles(tokenizer, encoder, handle_names, init_words, init_gen)
                       for tokenizer, encoder in base.text_encoder_pairs]
        mask_encoder = None
        if use_mask_tokens:
            torch.manual_seed(seed)  # nn.Linear's init draws from the global generator
            mask_encoder = MaskEncoder(base.text_width, input_mode=mask_encoder_input,
                                       output_norm=mask_token_norm).to(device)
        return cls(list(handle_names), handle_sets, mask_encoder)

    def add_adapters(self, base: BaseModel, lora: LoraConfig, device: torch.device | str) -> None:
        """Phase 2's trainables: LoRA on the UNet (and the text encoder), or every weight (``full``)."""
        if self.unet_params:
            raise RuntimeError("add_adapters ran twice on one MCGMState")
        if lora.phase2_mode == "full":
            base.unet.requires_grad_(True)
            self.unet_params = list(base.unet.parameters())
            for name, param in base.text_encoder.named_parameters():
                if "token_embedding" not in name:  # handle rows train through the wrapper only
                    param.requires_grad_(True)
                    self.text_encoder_params.append(param)
            self.lora = {"mode": "full", "rank": lora.rank, "alpha": lora.alpha, "unet_targets": [],
                         "text_encoder_targets": []}
            return
        self.unet_params = add_lora(base.unet, lora.unet_targets, lora.rank, lora.alpha)
        if lora.use_text_encoder_lora:
            self.text_encoder_params = add_lora(base.text_encoder, lora.text_encoder_targets, lora.rank,
                                                lora.alpha)
            # peft freezes every non-LoRA parameter of the model it injects into: the handles too.
            self.handles.vectors.requires_grad_(True)
        for param in self.unet_params + self.text_encoder_params:
            param.data = param.data.to(device)
        self.lora = {"mode": "lora", "rank": lora.rank, "alpha": lora.alpha,
                     "unet_targets": list(lora.unet_targets),
                     "text_encoder_targets": list(lora.text_encoder_targets) if self.text_encoder_params else []}

    def remove(self, base: BaseModel) -> None:
        """Take the handle wrapper, the mask encoder and the LoRA layers off ``base``.

        Afterwards ``base`` computes as it did when loaded, with two exceptions that cost nothing:
        the handle tokens stay in the tokenizer (transformers cannot remove added tokens;
        ``from_artifact`` reuses them), and ``full`` mode's trained weights stay in place (keeping a
        copy of the whole UNet is what that mode cannot afford).
        """
        for encoder, wrapper in zip(base.text_encoders, self.handle_sets):
            if isinstance(encoder.get_input_embeddings(), HandleEmbedding):
                encoder.set_input_embeddings(wrapper.base)
        for model in (base.unet, base.text_encoder):
            _remove_lora_layers(model)
            model.requires_grad_(False)
        self.unet_params, self.text_encoder_params, self.lora = [], [], {}

    # ------------------------------------------------------------------------------------------
    # Training.

    def parameter_groups(self, phase: int, t: TrainConfig) -> list[dict[str, Any]]:
        """The optimizer's groups for ``phase``, each with its learning rate from ``t``."""
        groups = []
        if not (phase == 2 and t.phase2_handle_lr == 0):
            groups.append({"params": [h.vectors for h in self.handle_sets],
                           "lr": t.handle_lr if phase == 1 else t.phase2_handle_lr})
        if self.mask_encoder is not None:
            groups.append({"params": list(self.mask_encoder.parameters()),
                           "lr": t.mask_encoder_lr if phase == 1 else t.phase2_mask_encoder_lr})
        if phase == 2 and self.unet_params:
            groups.append({"params": self.unet_params, "lr": t.lora_lr})
        if phase == 2 and self.text_encoder_params:
            groups.append({"params": self.text_encoder_params, "lr": t.text_encoder_lr})
        return groups

    def to(self, device: torch.device | str) -> MCGMState:
        for wrapper in self.handle_sets:
            wrapper.to(device)
        if self.mask_encoder is not None:
            self.mask_encoder.to(device)
        return self

    # ------------------------------------------------------------------------------------------
    # Weights: checkpoints (``state_dict``) and the artifact.

    def state_dict(self, base: BaseModel) -> dict[str, torch.Tensor]:
        """fp32 CPU copies of every trained weight: ``handles.vectors``, ``mask_encoder.*``,
        ``unet.*`` and ``text_encoder.*`` (adapter weights under peft's names)."""
        state = {vectors_key(i): h.vectors.detach().float().cpu() for i, h in enumerate(self.handle_sets)}
        if self.mask_encoder is not None:
            state |= {f"mask_encoder.{k}": v.float().cpu() for k, v in self.mask_encoder.state_dict().items()}
        state |= {f"unet.{k}": v.float().cpu() for k, v in self._adapter_state(base.unet).items()}
        if self._adapts_text_encoder():
            state |= {f"text_encoder.{k}": v.float().cpu()
                      for k, v in self._adapter_state(base.text_encoder).items()}
        return state

    def load_state_dict(self, base: BaseModel, tensors: dict[str, torch.Tensor]) -> None:
        """Load what ``state_dict`` returned (adapters must have been added when it has any)."""
        with torch.no_grad():
            for i, wrapper in enumerate(self.handle_sets):
                wrapper.vectors.copy_(tensors[vectors_key(i)])
        if self.mask_encoder is not None:
            self.mask_encoder.load_state_dict(_sub(tensors, "mask_encoder."))
        for prefix, module in (("unet.", base.unet), ("text_encoder.", base.text_encoder)):
            _load_adapter(module, _sub(tensors, prefix), self.lora)

    def to_artifact(self, base: BaseModel, run_meta: dict[str, Any]) -> Artifact:
        """The artifact of this state on ``base``; ``run_meta`` adds what the run knows (base
        model identity, resolution, training config)."""
        vectors = [h.vectors.detach().float().cpu() for h in self.handle_sets]
        return Artifact(
            handles=list(self.handle_names), handle_vector_sets=vectors,
            mask_encoder={k: v.float().cpu() for k, v in self.mask_encoder.state_dict().items()}
            if self.mask_encoder is not None else {},
            unet_lora=self._adapter_state(base.unet),
            text_encoder_lora=self._adapter_state(base.text_encoder) if self._adapts_text_encoder() else {},
            meta={**run_meta, "mask_size": self.mask_encoder.mask_size if self.mask_encoder is not None else 0,
                  "lora": dict(self.lora), **_encoder_options(self.mask_encoder),
                  **({SDXL_POOLING_KEY: SDXL_POOLING} if base.family.pooled_embedding else {})},
        )

    @classmethod
    def from_artifact(cls, base: BaseModel, artifact: Artifact) -> MCGMState:
        """Install a trained artifact on ``base`` (frozen, for sampling or export checks).

        ``base`` may be freshly loaded or one a removed state was on (its handle tokens are reused).
        """
        text_encoder = base.text_encoder
        if isinstance(text_encoder.get_input_embeddings(), HandleEmbedding):
            raise RuntimeError("from_artifact on a base that still carries a state: remove() it first")
        if len(artifact.handle_vector_sets) != len(base.text_encoders):
            raise UserError("The artifact and the base model are of different families (one is SDXL, the other "
                            "is not): pass the base model the artifact was trained on.")
        handle_sets = [_install_trained(tokenizer, encoder, artifact.handles, vectors)
                       for (tokenizer, encoder), vectors in zip(base.text_encoder_pairs, artifact.handle_vector_sets)]
        mask_encoder = None
        if artifact.uses_mask_tokens:
            with torch.random.fork_rng(devices=[]):  # nn.Linear's init draws from the global generator
                mask_encoder = MaskEncoder(artifact.text_width, int(artifact.meta["mask_size"]),
                                           input_mode=artifact.meta.get("mask_encoder_input", "binary"),
                                           output_norm=artifact.meta.get("mask_token_norm", "none"))
            mask_encoder.load_state_dict(artifact.mask_encoder)
        state = cls(list(artifact.handles), handle_sets, mask_encoder, lora=dict(artifact.meta.get("lora") or {}))
        for component, module, tensors in (("unet", base.unet, artifact.unet_lora),
                                           ("text_encoder", text_encoder, artifact.text_encoder_lora)):
            if tensors and state.lora.get("mode") != "full":
                targets = state.lora.get(f"{component}_targets") or sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
                add_lora(module, tuple(targets), int(state.lora["rank"]), float(state.lora["alpha"]))
            _load_adapter(module, tensors, state.lora)
        for module in (base.unet, *base.text_encoders, base.vae, *handle_sets):
            module.requires_grad_(False)
        if mask_encoder is not None:
            mask_encoder.requires_grad_(False).eval()
        return state

    def _adapter_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if not self.lora:
            return {}
        if self.lora["mode"] == "full":
            return {k: v for k, v in module.state_dict().items() if "token_embedding" not in k}
        return lora_state_dict(module)

    def _adapts_text_encoder(self) -> bool:
        return self.lora.get("mode") == "full" or bool(self.lora.get("text_encoder_targets"))


def _install_trained(tokenizer, text_encoder: nn.Module, handles: list[str], vectors: torch.Tensor) -> HandleEmbedding:
    """Trained handle rows on one text encoder: its tokens (reused if a removed state left them),
    its table's rows (whoever reads the table sees the handles) and the wrapper."""
    vocab = tokenizer.get_vocab()
    if all(h in vocab for h in handles):
        ids = tokenizer.convert_tokens_to_ids(handles)
    else:
        ids = add_handle_tokens(tokenizer, text_encoder, handles)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[ids] = vectors.to(embedding.weight.device, embedding.weight.dtype)
    wrapper = HandleEmbedding(embedding, ids, vectors.to(embedding.weight.device))
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def _encoder_options(encoder: MaskEncoder | None) -> dict[str, str]:
    """The encoder's options for the artifact's metadata, only where they differ from the paper's:
    an artifact of the paper's recipe stays format 1, readable by every lowmcgm (``save_artifact``
    stamps format 2 when these keys are present, since an older reader would silently ignore them)."""
    if encoder is None:
        return {}
    options = {}
    if encoder.input_mode != "binary":
        options["mask_encoder_input"] = encoder.input_mode
    if encoder.output_norm != "none":
        options["mask_token_norm"] = encoder.output_norm
    return options


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_adapter(module: nn.Module, tensors: dict[str, torch.Tensor], lora: dict[str, Any]) -> None:
    if not tensors:
        return
    if lora.get("mode") == "full":  # whole weights, handle rows excluded (they live in the handles)
        try:
            result = module.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:  # "size mismatch": weights of another architecture
            raise UserError(f"The artifact's weights do not fit this model: "
                            f"{str(exc).strip().splitlines()[-1].strip()}") from exc
        if result.unexpected_keys:
            raise UserError(f"The artifact's weights do not fit this model: unexpected {result.unexpected_keys[0]}.")
        return
    load_lora_state_dict(module, tensors)


def _remove_lora_layers(model: nn.Module) -> None:
    """Put each peft LoRA layer's original module back (no merge: the adapter is simply dropped)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # inject_adapter_in_model's record of the adapters it added
        del model.peft_config
