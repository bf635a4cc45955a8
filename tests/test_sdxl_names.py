"""kohya's SDXL LoRA names (``lowmcgm.interop.sdxl_names``): checked on the real SDXL base
architecture built on the meta device, against names kohya, A1111 and ComfyUI use, and through
diffusers' own kohya reader into a tiny SDXL pipeline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowmcgm.errors import UserError
from lowmcgm.interop.formats import TE_TARGET_NAMES, UNET_TARGET_NAMES
from lowmcgm.interop.sdxl_names import build_sgm_attention_blocks, kohya_sdxl_text_encoder_stem, kohya_sdxl_unet_stem
from lowmcgm.models.configs import config_folder
from lowmcgm.models.folder import save_base_model
from lowmcgm.models.tiny import build_tiny_base


def _target_paths(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Module paths PEFT's ``target_modules`` matching picks for ``names`` (whole name or suffix)."""
    return [path for path, _ in model.named_modules() if any(path == n or path.endswith(f".{n}") for n in names)]


def _kohya_stems(unet: nn.Module, te1: nn.Module, te2: nn.Module) -> dict[str, str]:
    """``{"unet.<path>" | "text_encoder.<path>" | "text_encoder_2.<path>": kohya stem}``."""
    stems = {f"unet.{p}": kohya_sdxl_unet_stem(p, unet.config) for p in _target_paths(unet, UNET_TARGET_NAMES)}
    for encoder, (part, model) in enumerate((("text_encoder", te1), ("text_encoder_2", te2)), start=1):
        for path in _target_paths(model, TE_TARGET_NAMES):
            stems[f"{part}.{path}"] = kohya_sdxl_text_encoder_stem(path, encoder)
    return stems


@pytest.fixture(scope="module")
def sdxl_meta():
    """SDXL base 1.0's UNet and text encoders, shapes only (no weights: 3.4 GB in fp16)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_folder("sdxl-base")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return unet, te1, te2


def test_every_sdxl_lora_target_gets_a_distinct_kohya_name(sdxl_meta):
    unet, te1, te2 = sdxl_meta
    stems = _kohya_stems(unet, te1, te2)
    assert len(set(stems.values())) == len(stems)
    parts = {prefix: sum(s.startswith(prefix) for s in stems.values())
             for prefix in ("lora_unet_", "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")}
    # 12 and 32 CLIP layers of 6 linears; the UNet count is kohya's own rule (every Linear or Conv2d
    # inside a Transformer2DModel, networks/lora.py UNET_TARGET_REPLACE_MODULE), so lowmcgm's
    # targets are exactly what a default kohya SDXL LoRA holds (722 modules, 2166 tensors).
    kohya_unet = sum(isinstance(child, (nn.Linear, nn.Conv2d)) for module in unet.modules()
                     if type(module).__name__ == "Transformer2DModel" for child in module.modules())
    assert list(parts.values()) == [kohya_unet, 12 * 6, 32 * 6] and kohya_unet == 722


# Expected names: kohya sd-scripts library/sdxl_model_util.py make_unet_conversion_map pairs
# down_blocks.{i}.attentions.{j} with input_blocks.{3i+j+1}.1, up_blocks.{i}.attentions.{j} with
# output_blocks.{3i+j}.1 and mid_block.attentions.0 with middle_block.1; networks/lora.py joins
# "lora_unet" + Transformer2DModel path + child path with underscores. The first three UNet names
# also appear verbatim in published SDXL LoRA key lists; the text-encoder names are ComfyUI's
# comfy/lora.py model_lora_keys_clip "#SDXL base" keys (lora_te1_/lora_te2_text_model_encoder_layers_).
@pytest.mark.parametrize("part, path, name", [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("unet", "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
     "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"),
    ("unet", "up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_v",
     "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_v"),
    ("unet", "down_blocks.2.attentions.1.proj_in", "lora_unet_input_blocks_8_1_proj_in"),
    ("unet", "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0",
     "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0"),
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.0.proj",
     "lora_unet_output_blocks_2_1_transformer_blocks_3_ff_net_0_proj"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder", "encoder.layers.11.mlp.fc2", "lora_te1_text_model_encoder_layers_11_mlp_fc2"),
    ("text_encoder_2", "text_model.encoder.layers.31.self_attn.out_proj",
     "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"),
])
def test_sdxl_names_match_kohyas(sdxl_meta, part, path, name):
    stems = _kohya_stems(*sdxl_meta)
    assert stems[f"{part}.{path}"] == name


def test_sgm_blocks_follow_the_config_not_sdxls_numbers(sdxl_meta):
    tiny = build_tiny_base("tiny-xl").unet.config  # 3 levels of 1 layer, the first without attention
    assert build_sgm_attention_blocks(tiny) == {
        "down_blocks.1.attentions.0": "input_blocks.3.1", "down_blocks.2.attentions.0": "input_blocks.5.1",
        "mid_block.attentions.0": "middle_block.1",
        "up_blocks.0.attentions.0": "output_blocks.0.1", "up_blocks.0.attentions.1": "output_blocks.1.1",
        "up_blocks.1.attentions.0": "output_blocks.2.1", "up_blocks.1.attentions.1": "output_blocks.3.1",
    }
    # SGM's UNetModel with num_res_blocks per level: level 1 has 1 layer, level 2 three.
    uneven = {**sdxl_meta[0].config, "layers_per_block": [2, 1, 3]}
    blocks = build_sgm_attention_blocks(uneven)
    assert blocks["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert blocks["down_blocks.2.attentions.2"] == "input_blocks.8.1"
    assert blocks["up_blocks.0.attentions.3"] == "output_blocks.3.1"  # up level 0 mirrors down level 2: 3 + 1
    assert blocks["up_blocks.1.attentions.1"] == "output_blocks.5.1"


def test_modules_outside_transformer_blocks_have_no_sdxl_name(sdxl_meta):
    with pytest.raises(UserError, match="down_blocks.1.resnets.0.conv1.*lora.unet_targets"):
        kohya_sdxl_unet_stem("down_blocks.1.resnets.0.conv1", sdxl_meta[0].config)
    with pytest.raises(UserError, match="down_blocks.0.attentions.0"):  # SDXL's first level has none
        kohya_sdxl_unet_stem("down_blocks.0.attentions.0.proj_in", sdxl_meta[0].config)


def test_diffusers_reads_every_real_sdxl_name_back_to_its_module(sdxl_meta):
    """Names only: diffusers' SDXL reader maps SGM names with the config, no weights needed."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = sdxl_meta[0]
    stems = {kohya_sdxl_unet_stem(p, unet.config): p for p in _target_paths(unet, UNET_TARGET_NAMES)}
    state = {}
    for i, stem in enumerate(stems):
        state[f"{stem}.lora_down.weight"] = torch.full((1, 1), float(i))
        state[f"{stem}.lora_up.weight"] = torch.full((1, 1), -float(i))
    read, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in read.items()})
    landed = {key.removesuffix(".lora_A.weight"): int(v) for key, v in peft.items() if key.endswith(".lora_A.weight")}
    assert landed == {path: i for i, path in enumerate(stems.values())}


def test_kohya_sdxl_file_lands_on_the_intended_modules_in_diffusers(tmp_path):
    """Round trip through diffusers' own loader: kohya-named file -> tiny SDXL pipeline -> PEFT layers."""
    from diffusers import StableDiffusionXLPipeline

    base = build_tiny_base("tiny-xl")
    save_base_model(base, tmp_path / "base")
    rank, alpha = 2, 3.0  # alpha != rank: a lost or misplaced alpha changes the scale
    gen = torch.Generator().manual_seed(0)
    models = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    expected, state = {}, {}
    for key, stem in _kohya_stems(*models.values()).items():
        part, path = key.split(".", 1)
        layer = models[part].get_submodule(path)
        down = torch.randn(rank, layer.in_features, generator=gen)  # (r, in)
        up = torch.randn(layer.out_features, rank, generator=gen)  # (out, r)
        state.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                      f"{stem}.alpha": torch.tensor(alpha)})
        expected[key] = (down, up)
    # tiny-xl: 7 transformers holding 11 blocks of 10 linears, plus proj_in/out; 2 CLIP layers of 6 linears each.
    assert len(expected) == 11 * 10 + 7 * 2 + 2 * 2 * 6
    save_file(state, tmp_path / "lora.safetensors")

    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    landed = {}
    for part in models:
        for path, module in getattr(pipe, part).named_modules():
            if hasattr(module, "lora_A") and module.lora_A:
                (adapter,) = module.lora_A.keys()
                assert module.scaling[adapter] == alpha / rank, f"{part}.{path}"
                landed[f"{part}.{path}"] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight)
    assert landed.keys() == expected.keys()
    for key, (down, up) in expected.items():
        assert torch.equal(landed[key][0], down) and torch.equal(landed[key][1], up), key
