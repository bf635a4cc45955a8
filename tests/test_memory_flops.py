"""lowmcgm.memory.flops: the counting, on real CPU tensors of the tiny models (the fake-CUDA runs on
SD-size models are tools/bench_flops.py's, docs/benchmarks.md "Compute per step")."""


import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lowmcgm.config import resolve_config
from lowmcgm.errors import UserError
from lowmcgm.memory import trace as mt
from lowmcgm.memory.estimate import build_job
from lowmcgm.memory.flops import CAPTURE, LOSSES, OTHER, WINDOWS, FlopCount, count_job
from lowmcgm.memory.peers import KOHYA_DOC_FLAGS, kohya_flags
from lowmcgm.models.tiny import build_tiny_base
from tools_loader import load_tool

TINY = {"model.use_vae_offload": False}  # a CPU run cannot move the VAE off "the device"
CONFIGS = {
    "checkpointing": TINY | {"model.use_gradient_checkpointing": True},
    "no checkpointing": TINY | {"model.use_gradient_checkpointing": False},
    "no attention loss": TINY | {"model.use_gradient_checkpointing": True, "loss.use_attention_loss": False},
}


@pytest.fixture(scope="module")
def tiny_steps():
    """One counted training step per phase of each configuration, on the tiny model (CPU, fp32)."""
    out = {}
    for name, over in CONFIGS.items():
        job = build_job(resolve_config("tiny-cpu", None, over), "tiny")
        out[name] = mt.measure_real_cpu(count_job, {k: v for k, v in job.items() if k != "label"})["result"]
    return out


def test_backward_of_trained_layers_counts_twice_their_forward():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16, requires_grad=True)
    with FlopCount() as count:
        mlp(x).square().mean().backward()
    assert count.flops("forward") == 2 * 4 * (16 * 32 + 32 * 8)
    assert count.flops("backward") == 2 * count.flops("forward")  # gradients of inputs and of weights
    assert count.flops("recompute") == 0
    assert count.element_ops("forward") > 0  # ReLU, square, mean: not matrix FLOPs, counted apart


def test_totals_are_torch_flop_counter_modes_on_a_tiny_unet_step():
    unet = build_tiny_base("tiny").unet
    sample = torch.randn(1, unet.config.in_channels, 16, 16)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)

    def step():
        unet(sample, torch.tensor([10]), context).sample.square().mean().backward()

    with FlopCount() as ours:
        step()
    with FlopCounterMode(display=False) as torchs:
        step()
    assert ours.flops() == torchs.get_total_flops() > 0
    assert ours.flops(part=OTHER) == 0  # everything inside the UNet: its part
    assert ours.flops(part="unet") == ours.flops()


def test_checkpointing_adds_recomputation_and_leaves_forward_and_backward_alone(tiny_steps):
    for on, off in zip(tiny_steps["checkpointing"]["phases"], tiny_steps["no checkpointing"]["phases"]):
        assert off["windows"]["recompute"] == 0
        assert 0 < on["windows"]["recompute"] < on["windows"]["forward"]  # blocks, not the whole step
        assert on["windows"]["forward"] == off["windows"]["forward"]
        assert on["windows"]["backward"] == off["windows"]["backward"]
        assert on["total_flops"] == off["total_flops"] + on["windows"]["recompute"]


def test_windows_and_parts_each_sum_to_the_total_with_nothing_unattributed(tiny_steps):
    for phase in tiny_steps["checkpointing"]["phases"]:
        assert sum(phase["windows"][w] for w in WINDOWS) == phase["total_flops"]
        assert sum(phase["parts"].values()) == phase["total_flops"]
        assert phase["parts"].get(OTHER, 0) == 0
        assert {"unet", "text encoder", "mask encoder", CAPTURE} <= set(phase["parts"])
        # Frozen base layers need only their inputs' gradients: the backward is about the forward.
        assert 0.5 < phase["windows"]["backward"] / phase["windows"]["forward"] < 2.0


def test_capture_and_losses_are_itemised(tiny_steps):
    for with_capture, without in zip(tiny_steps["checkpointing"]["phases"], tiny_steps["no attention loss"]["phases"]):
        table = with_capture["table"]
        # The capture's logits in the forward, again when its block is recomputed, and their gradients.
        for window in ("forward", "recompute", "backward"):
            assert table[window][CAPTURE]["flops"] > 0, window
        assert without["capture_flops"] == 0
        assert without["total_flops"] == with_capture["total_flops"] - with_capture["capture_flops"]
        # The losses are element-wise: no matrix FLOPs, but their element operations are counted.
        assert with_capture["losses_flops"] == 0
        assert with_capture["losses_element_ops"] > without["losses_element_ops"] > 0
        assert table["forward"][LOSSES]["element_ops"] > 0


def test_kohya_flags_take_a_batch_size_after_the_documented_one():
    flags = kohya_flags(16, 512, batch_size=2)
    assert flags[:len(KOHYA_DOC_FLAGS)] == list(KOHYA_DOC_FLAGS)
    assert flags.index("--train_batch_size=2") > flags.index("--train_batch_size=1")  # argparse: the last wins
    assert "--train_batch_size=2" not in kohya_flags(16, 512)


def test_bench_flops_rows_name_shipped_presets_and_refuse_a_non_kohya_folder(tmp_path):
    bench = load_tool("bench_flops")
    for _, preset, over, _ in bench.SD_ROWS + bench.SDXL_ROWS:
        resolve_config(preset, None, over)
    with pytest.raises(UserError, match="not a kohya-ss/sd-scripts checkout"):
        bench.main(["--kohya", str(tmp_path)])


def test_bench_flops_counts_kohyas_sdxl_step_beside_the_sdxl_presets(tmp_path, monkeypatch):
    bench = load_tool("bench_flops")
    sd = ("train_network.py", "networks/lora.py", "library/original_unet.py", "library/train_util.py")
    sdxl = ("sdxl_train_network.py", "library/sdxl_original_unet.py", "library/sdxl_train_util.py",
            "library/strategy_sdxl.py")
    for name in sd:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(UserError, match="no SDXL trainer"):  # an SD-only checkout: refused before tracing
        bench.main(["--model", "sdxl", "--kohya", str(tmp_path)])
    for name in sdxl:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    calls = []

    class Stop(Exception):
        pass

    def run_traced(entry, kwargs, *_, **__):  # no trace: lowmcgm's rows empty, stop at kohya's
        calls.append((entry, kwargs))
        if entry.endswith(":count_jobs"):
            return {"result": [{"phases": []} for _ in kwargs["jobs"]]}
        raise Stop

    monkeypatch.setattr(bench.mt, "run_traced", run_traced)
    with pytest.raises(Stop):  # not refused: it goes on to count kohya's SDXL step
        bench.main(["--model", "sdxl", "--kohya", str(tmp_path)])
    entry, kwargs = calls[-1]
    assert entry == "lowmcgm.memory.flops:count_kohya_sdxl"
    assert kwargs == {"kohya": str(tmp_path.resolve()),
                      "runs": [{"rank": 32, "resolution": 1024}, {"rank": 64, "resolution": 1024}]}
    # Each SDXL preset's kohya peer is at its LoRA rank, 1 image/step.
    for _, preset, over, peer in bench.SDXL_ROWS:
        cfg = resolve_config(preset, None, over)
        assert peer == (cfg.lora.rank, cfg.train.batch_size) == (peer[0], 1)


def test_tagged_functions_are_put_back():
    from lowmcgm import attention_capture

    before = attention_capture.compute_selected_probs, F.mse_loss, torch.nn.utils.clip_grad_norm_
    with FlopCount():
        assert F.mse_loss is not before[1]
    assert (attention_capture.compute_selected_probs, F.mse_loss, torch.nn.utils.clip_grad_norm_) == before
