"""The artifact file: round trip, atomic writes, validation before allocation, size for SD 1.5."""

import json
import struct

import pytest
import torch
from diffusers import UNet2DConditionModel

from lowmcgm.adapters import add_lora
from lowmcgm.artifact import (Artifact, atomic_save, load_artifact, load_checkpoint, read_header, save_artifact,
                              save_checkpoint)
from lowmcgm.config import LoraConfig
from lowmcgm.errors import UserError


def _artifact(k=2, d=8, rank=2):
    g = torch.Generator().manual_seed(0)
    return Artifact(
        handles=[f"<asset{i}>" for i in range(k)], handle_vector_sets=[torch.randn(k, d, generator=g)],
        mask_encoder={"proj.weight": torch.randn(d, 64 * 64, generator=g), "proj.bias": torch.randn(d, generator=g)},
        unet_lora={"a.to_q.lora_A.weight": torch.randn(rank, 4, generator=g),
                   "a.to_q.lora_B.weight": torch.randn(4, rank, generator=g)},
        text_encoder_lora={},
        meta={"text_width": d, "mask_size": 64, "base_model": "tiny", "lora": {"rank": rank, "alpha": 4.0}},
    )


def test_round_trip(tmp_path):
    art = _artifact()
    path = tmp_path / "a.safetensors"
    save_artifact(art, path, dtype="fp32")
    back = load_artifact(path)
    assert back.handles == art.handles and back.uses_mask_tokens
    torch.testing.assert_close(back.handle_vectors, art.handle_vectors)
    torch.testing.assert_close(back.unet_lora["a.to_q.lora_A.weight"], art.unet_lora["a.to_q.lora_A.weight"])
    assert back.meta["lora"] == {"rank": 2, "alpha": 4.0} and back.meta["base_model"] == "tiny"


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.safetensors"
    atomic_save({"a": torch.zeros(2)}, {}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"a": torch.zeros(2), "b": "not a tensor"}, {}, path)  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def _forge(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("case,fragment", [
    ("short", "too short"), ("huge-header", "header of"), ("not-json", "unreadable header"),
    ("size-lie", "claims a size"), ("not-artifact", "not a lowmcgm artifact"), ("future", "format 99"),
    ("wrong-shape", "handles.vectors must be"), ("int-dtype", "dtype I64"),
])
def test_refuses_bad_files(tmp_path, case, fragment):
    path = tmp_path / "bad.safetensors"
    meta = {"format": "lowmcgm", "format_version": "1", "handles": json.dumps(["<a>"]), "text_width": "4"}
    if case == "short":
        path.write_bytes(b"abc")
    elif case == "huge-header":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif case == "not-json":
        path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x")
    elif case == "size-lie":
        _forge(path, {"__metadata__": meta, "handles.vectors": {"dtype": "F32", "shape": [1000, 1000],
                                                                 "data_offsets": [0, 4000000]}}, b"\0" * 16)
    elif case == "not-artifact":
        atomic_save({"x": torch.zeros(1)}, {}, path)
    elif case == "future":
        atomic_save({"x": torch.zeros(1)}, meta | {"format_version": "99"}, path)
    elif case == "wrong-shape":
        atomic_save({"handles.vectors": torch.zeros(2, 4)}, meta, path)
    elif case == "int-dtype":
        atomic_save({"handles.vectors": torch.zeros(1, 4, dtype=torch.long)}, meta, path)
    with pytest.raises(UserError, match=fragment):
        load_artifact(path)


def test_header_is_read_without_tensor_data(tmp_path):
    path = tmp_path / "a.safetensors"
    save_artifact(_artifact(), path)
    header, meta = read_header(path)
    assert header["handles.vectors"]["shape"] == [2, 8] and meta["format"] == "lowmcgm"


def test_checkpoint_round_trip_with_optimizer_state(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", {"w": p.detach()}, opt.state_dict(), {"step": 1})
    weights, state, info = load_checkpoint(tmp_path / "c.safetensors")
    assert info == {"step": 1} and torch.equal(weights["w"], p.detach())
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    opt2.load_state_dict(state)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rank4_sd15_artifact_is_under_12_mb():
    from lowmcgm.models.configs import config_folder

    with torch.device("meta"):  # the real SD 1.5 layout, from its shipped config
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_folder("sd15") / "unet"))
    unet.requires_grad_(False)
    lora = add_lora(unet, LoraConfig().unet_targets, rank=4, alpha=4)
    lora_values = sum(p.numel() for p in lora)
    values = lora_values + 768 * 64 * 64 + 768 + 2 * 768  # + mask encoder + two handles
    assert values * 2 < 12e6, f"{values * 2 / 1e6:.1f} MB in fp16"
