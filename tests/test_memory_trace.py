"""Tests of lowmcgm.memory.trace (fake-CUDA tracing: shim, session, counters) and of the shipped model configs.

The fake-CUDA runs happen in subprocesses (the shim must be loaded before torch); the shim is
compiled once per session (and cached across sessions in ~/.cache/lowmcgm).
"""

from __future__ import annotations

import json
import os
import time

import memory_fixtures
import pytest
import torch

from lowmcgm.memory import trace as mt
from lowmcgm.models.configs import SHIPPED_CONFIGS, config_folder

GiB = 2**30
# Single-threaded children: the test machines have few cores, shared.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def shim():
    if mt.torch_is_gpu_build():
        pytest.skip("a CUDA/ROCm build of torch needs no shim")
    return mt.ensure_shim()


def _traced(fn: str, kwargs: dict | None = None, mode: str = "fake", timeout_s: float = 120):
    return mt.run_traced(fn, kwargs or {}, timeout_s, mode=mode, env=CHILD_ENV)


# --------------------------------------------------------------------------- the shim


def test_shim_compiles_once_and_is_cached(shim):
    assert shim.exists() and shim.suffix == ".so"
    assert shim.name.startswith("fake_cuda_guard-torch")
    assert f"torch{mt.torch_version()}" in shim.name
    start = time.perf_counter()
    assert mt.ensure_shim() == shim  # cached: no second compilation
    assert time.perf_counter() - start < 1.0


def test_shim_refuses_to_load_after_torch():
    with pytest.raises(RuntimeError, match="before torch is imported"):
        mt.load_shim(os.devnull)


# --------------------------------------------------------------------------- fake CUDA runs


TINY_VARIANTS = {
    "full": {"steps": 2},                                                  # full fine-tune, AdamW
    "lora-gc": {"steps": 2, "lora_rank": 4, "gradient_checkpointing": True},  # LoRA, checkpointing
}


def _trace_variants(variants: dict) -> dict:
    """Traced in a child: several tiny steps in one process (one start-up), each with its own peak."""
    import gc

    s = mt.session()
    out = {}
    for name, kwargs in variants.items():
        gc.collect()
        s.reset_peak()
        first = len(s.counter.snapshots)
        baseline = s.counter.current
        res = memory_fixtures.tiny_unet_step(**kwargs)
        out[name] = {"baseline_bytes": baseline, "peak_bytes": s.counter.peak, "result": res,
                     "snapshots": s.counter.snapshots[first:]}
    return out


@pytest.fixture(scope="module")
def fake_tiny_runs(shim):
    out = _traced(f"{__name__}:_trace_variants", {"variants": TINY_VARIANTS})
    assert out["mode"] == "fake" and out["device"] == "cuda"
    return out["result"]


def test_fake_tiny_unet_forward_backward_has_positive_peak(fake_tiny_runs):
    run = fake_tiny_runs["full"]
    res = run["result"]
    assert run["baseline_bytes"] == 0
    assert run["peak_bytes"] > 0 and run["peak_bytes"] == res["peak_bytes"]
    # every parameter is trained, in fp32: weights and gradients are 4 bytes a parameter
    assert res["gradient_bytes"] >= 4 * res["params"]
    labels = [s["label"] for s in run["snapshots"]]
    assert labels == ["weights"] + [f"step{i}.{p}" for i in range(2)
                                     for p in ("forward", "backward", "optimizer")]
    weights = run["snapshots"][0]["current_bytes"]
    assert 4 * res["params"] <= weights < 4 * res["params"] * 1.05
    assert run["peak_bytes"] > weights + res["gradient_bytes"] + res["optimizer_state_bytes"]
    # AdamW keeps two fp32 moments a parameter
    assert res["optimizer_state_bytes"] >= 8 * res["params"]


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_fake_peak_matches_real_cpu_counter(fake_tiny_runs, variant):
    fake = fake_tiny_runs[variant]
    torch.manual_seed(0)
    real = mt.measure_real_cpu(memory_fixtures.tiny_unet_step, TINY_VARIANTS[variant])
    assert real["mode"] == "cpu" and real["device"] == "cpu"
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.05 * real["peak_bytes"], (
        fake["peak_bytes"], real["peak_bytes"])
    # the parts agree too: same weights, same gradients
    assert fake["snapshots"][0]["current_bytes"] == pytest.approx(
        real["snapshots"][0]["current_bytes"], rel=0.01)
    assert fake["result"]["gradient_bytes"] == real["result"]["gradient_bytes"]


def _exercise_fake_session() -> dict:
    """Traced in a child: the behaviours a trainer step relies on under fake CUDA."""
    s = mt.session()
    out: dict = {"mode": s.mode, "device": str(s.device)}
    # CPU-side work stays real: .item() on CPU, data-dependent shapes
    k = int(torch.randint(1, 4, (1,)).item())
    mask = torch.rand(8, 8) > 2.0
    out["cpu_item_ok"] = 1 <= k <= 3 and int(mask.sum().item()) == 0
    out["cpu_is_real"] = not isinstance(torch.ones(2), mt.FakeTensor)
    # modules built normally can be moved and cast (swap of fake tensors), and get adapters
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    lin.to(s.device, dtype=torch.float16)
    out["to_ok"] = lin[0].weight.dtype == torch.float16 and lin[0].weight.device.type == "cuda"
    lin.half().float()
    out["counted_after_cast"] = s.counter.current
    # .item() of a device tensor has no data: 0
    out["fake_item"] = lin(torch.ones(1, 64, device=s.device)).sum().item()
    # autocast applies the CUDA policy
    x = torch.randn(4, 64, device=s.device)
    with torch.autocast("cuda", dtype=torch.float16):
        out["autocast_dtype"] = str(lin[0](x).dtype)
    # SDPA takes the flash kernel: no (L, L) matrix is ever live
    L = 4096
    q = torch.randn(1, 1, L, 64, device=s.device, dtype=torch.float16, requires_grad=True)
    s.reset_peak()
    base = s.counter.current
    o = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    o.float().sum().backward()
    out["sdpa_extra_peak"] = s.counter.peak - base
    out["lxl_fp16_bytes"] = L * L * 2
    # torch.cuda statistics read the fake counter
    out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    out["counter_peak"] = s.counter.peak
    return out


def test_fake_session_behaves_like_a_gpu(shim):
    out = _traced(f"{__name__}:_exercise_fake_session")
    res = out["result"]
    assert res["mode"] == "fake" and res["device"] == "cuda"
    assert res["cpu_item_ok"] and res["cpu_is_real"]
    assert res["to_ok"]
    assert res["counted_after_cast"] >= 64 * 64 * 4  # fp32 weights after .float()
    assert res["fake_item"] == 0
    assert res["autocast_dtype"] == "torch.float16"
    assert 0 < res["sdpa_extra_peak"] < res["lxl_fp16_bytes"] / 4
    assert res["cuda_max_allocated"] == res["counter_peak"]


def _raise_in_child(message: str) -> None:
    raise ValueError(message)


def test_errors_in_the_child_are_raised_with_traceback(shim):
    with pytest.raises(mt.TraceError) as info:
        _traced(f"{__name__}:_raise_in_child", {"message": "boom 42"})
    assert "ValueError: boom 42" in str(info.value)
    assert "_raise_in_child" in info.value.child_traceback


def test_session_outside_a_trace_raises():
    assert mt.current_session() is None
    with pytest.raises(RuntimeError, match="no trace session"):
        mt.session()


def test_live_bytes_counts_storages_once_and_releases_them():
    with mt.LiveBytes("cpu") as counter:
        a = torch.empty(1000)          # 4000 B -> 4096 (512-B granularity)
        b = a.view(10, 100)            # a view: same storage
        c = torch.empty(10)            # 40 B -> 512
        assert counter.current == 4096 + 512
        counter.snapshot("both")
        del a, b
        assert counter.current == 512
        assert counter.peak == 4096 + 512
        del c
    assert counter.current == 0
    assert counter.snapshots[0] == {"label": "both", "current_bytes": 4608, "peak_bytes": 4608,
                                    "peak_since_last_bytes": 4608}
    assert mt.storage_bytes([torch.empty(1000), None, torch.empty(1)]) == 4096 + 512


def test_materialize_real_keeps_ties_grad_flags_and_dtypes():
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    m[1].weight = m[0].weight  # tied, frozen
    m[0].weight.requires_grad_(False)
    mt.materialize_fake(m, lambda n, p: None if p.requires_grad else torch.float16, "cpu")
    assert m[1].weight is m[0].weight
    assert m[0].weight.device.type == "cpu" and m[0].weight.dtype == torch.float16
    assert not m[0].weight.requires_grad
    assert m[1].bias.dtype == torch.float32 and m[1].bias.requires_grad
    assert torch.isfinite(m[0].weight).all() and (m[1].bias == 0).all()


# --------------------------------------------------------------------------- shipped configs

# Parameter counts of the public checkpoints, in millions.
KNOWN_PARAMS = {
    "sd15": {"unet": 859.52, "text_encoder": 123.06, "vae": 83.65},
    "sd21-base": {"unet": 865.91, "text_encoder": 340.39, "vae": 83.65},
    "sd21-768": {"unet": 865.91, "text_encoder": 340.39, "vae": 83.65},
    "sdxl-base": {"unet": 2567.46, "text_encoder": 123.06, "vae": 83.65},  # text_encoder_2: test_sdxl.py
}


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_shipped_config_parameter_counts(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = config_folder(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = mt.build_from_config(AutoencoderKL, folder / "vae")
    te = mt.build_from_config(CLIPTextModel, folder / "text_encoder")
    for part, model in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        assert next(model.parameters()).device.type == "meta"
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert round(n, 2) == KNOWN_PARAMS[name][part], (part, n)


@pytest.mark.parametrize("name,prediction,sample,cross,head_dim,hidden,pad", [
    ("sd15", "epsilon", 64, 768, 8, "quick_gelu", "<|endoftext|>"),
    ("sd21-base", "epsilon", 64, 1024, [5, 10, 20, 20], "gelu", "!"),
    ("sd21-768", "v_prediction", 96, 1024, [5, 10, 20, 20], "gelu", "!"),
])
def test_shipped_config_contents(name, prediction, sample, cross, head_dim, hidden, pad):
    folder = config_folder(name)
    read = lambda *p: json.loads(folder.joinpath(*p).read_text())  # noqa: E731
    sched = read("scheduler", "scheduler_config.json")
    assert sched["prediction_type"] == prediction
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (
        0.00085, 0.012, "scaled_linear")
    assert sched["steps_offset"] == 1 and not sched["clip_sample"] and not sched["set_alpha_to_one"]
    unet = read("unet", "config.json")
    assert (unet["sample_size"], unet["cross_attention_dim"], unet["attention_head_dim"]) == (
        sample, cross, head_dim)
    assert unet["use_linear_projection"] == (name != "sd15")
    vae = read("vae", "config.json")
    assert vae["sample_size"] == sample * 8 and vae["scaling_factor"] == 0.18215
    assert read("text_encoder", "config.json")["hidden_act"] == hidden
    assert read("tokenizer", "special_tokens_map.json")["pad_token"] == pad
    assert read("tokenizer", "tokenizer_config.json")["model_max_length"] == 77
    assert not (folder / "tokenizer" / "vocab.json").exists()
    index = read("model_index.json")
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"][1] == sched["_class_name"]
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_config(sched).config.prediction_type == prediction


def test_config_folder_unknown_name():
    with pytest.raises(KeyError, match="sd15"):
        config_folder("sdxl")


# --------------------------------------------------------------------------- SD size


@pytest.mark.slow
def test_sd15_lora_step_reproduces_the_probe(shim):
    out = memory_fixtures.trace_unet_lora_step("sd15", 512, rank=4, gradient_checkpointing=True, dtype="fp16",
                                               mode="fake", timeout_s=280)
    res = out["result"]
    assert res["params"] == 859_520_964 + res["trainable_params"]
    assert res["trainable_params"] == 797_184
    # the probe: 1.865 GiB for the UNet alone (fp16 weights 1.60 GiB)
    assert 1.80 * GiB < out["peak_bytes"] < 1.95 * GiB
    assert res["frozen_weight_bytes"] == pytest.approx(1.601 * GiB, rel=0.002)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a real GPU")
def test_fake_estimate_against_real_cuda():  # pragma: no cover - no GPU where this was written
    kwargs = {"steps": 2, "latent_size": 32, "lora_rank": 4, "dtype": "fp16"}
    real = mt.run_traced("memory_fixtures:tiny_unet_step", kwargs, 300, mode="cuda")
    fake = mt.run_traced("memory_fixtures:tiny_unet_step", kwargs, 300, mode="fake")
    assert real["mode"] == "cuda" and real["peak_reserved_bytes"] >= real["peak_bytes"]
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.10 * real["peak_bytes"]
