"""lowmcgm.memory.kohya_sdxl and tools/bench_memory_sdxl.py: the flags, the checks made before any trace,
and the tables built from traced figures.

Tracing kohya's SDXL step needs a kohya-ss/sd-scripts checkout, which is not part of this repository:
that runs in tools/bench_memory_sdxl.py --kohya PATH, not here.
"""

from pathlib import Path
from unittest import mock

import pytest

from lowmcgm.errors import UserError
from lowmcgm.memory import kohya_sdxl
from lowmcgm.memory.estimate import Estimate, PhaseEstimate
from lowmcgm.memory.kohya_sdxl import (SDXL_DOC_FLAGS, SDXL_VARIANTS, check_kohya_sdxl_checkout, check_variants,
                                       sdxl_flags, trace_kohya_sdxl)
from tools_loader import load_tool

GiB = 2**30
SD_FILES = ("train_network.py", "networks/lora.py", "library/original_unet.py", "library/train_util.py")
SDXL_FILES = ("sdxl_train_network.py", "library/sdxl_original_unet.py", "library/sdxl_train_util.py",
              "library/strategy_sdxl.py")


def _checkout(root: Path, files) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


def test_flags_are_kohyas_documented_low_vram_sdxl_settings_with_rank_and_fp8():
    flags = sdxl_flags(32)
    assert flags[:len(SDXL_DOC_FLAGS)] == list(SDXL_DOC_FLAGS)
    assert {"--network_dim=32", "--resolution=1024", "--network_train_unet_only", "--cache_text_encoder_outputs",
            "--cache_latents", "--gradient_checkpointing", "--mixed_precision=fp16", "--no_half_vae",
            "--optimizer_type=AdamW8bit", "--sdpa", "--train_batch_size=1"} <= set(flags)
    assert "--fp8_base" not in flags
    assert "--fp8_base" in sdxl_flags(8, fp8_base=True)
    assert "--resolution=512" in sdxl_flags(8, resolution=512)
    # Both ranks (lowmcgm's SDXL presets' 32, the docs' 8), each without and with fp8.
    assert sorted(SDXL_VARIANTS) == [(8, False), (8, True), (32, False), (32, True)]


@pytest.mark.parametrize("bad", [[], [(0, False)], [(-8, True)], [(8.0, False)], [(True, False)], [(8, 1)],
                                 [(8, "yes")]])
def test_variants_are_positive_ranks_with_a_bool_fp8_flag(bad):
    with pytest.raises(ValueError):
        check_variants(bad)
    assert check_variants([[32, True], (8, False)]) == [(32, True), (8, False)]


def test_checkout_is_checked_for_the_sd_and_the_sdxl_files(tmp_path):
    with pytest.raises(UserError, match="train_network.py"):
        check_kohya_sdxl_checkout(tmp_path)
    _checkout(tmp_path, SD_FILES)
    with pytest.raises(UserError, match="no SDXL trainer: sdxl_train_network.py, library/sdxl_original_unet.py"):
        check_kohya_sdxl_checkout(tmp_path)
    _checkout(tmp_path, SDXL_FILES)
    assert check_kohya_sdxl_checkout(tmp_path) == tmp_path.resolve()


def test_trace_checks_its_arguments_before_starting_a_subprocess(tmp_path):
    with mock.patch.object(kohya_sdxl.mt, "run_traced") as run:
        with pytest.raises(ValueError):
            trace_kohya_sdxl(tmp_path, [(0, True)])
        with pytest.raises(UserError, match="not a kohya-ss/sd-scripts checkout"):
            trace_kohya_sdxl(tmp_path, SDXL_VARIANTS)
        run.assert_not_called()
        run.return_value = {"result": ["figures"]}
        root = _checkout(tmp_path, SD_FILES + SDXL_FILES)
        assert trace_kohya_sdxl(root, [(8, True)]) == ["figures"]
        fn, kwargs = run.call_args.args[:2]
        assert fn == "lowmcgm.memory.kohya_sdxl:kohya_sdxl_steps"
        assert kwargs == {"kohya": str(root.resolve()), "variants": [[8, True]], "resolution": 1024}
        assert run.call_args.kwargs["mode"] == "fake"


def test_bench_refuses_a_missing_or_non_kohya_folder_before_tracing(tmp_path):
    bench = load_tool("bench_memory_sdxl")
    with mock.patch.object(bench, "run_jobs") as run:
        with pytest.raises(SystemExit):
            bench.main([])  # --kohya is required
        with pytest.raises(UserError, match="not a kohya-ss/sd-scripts checkout"):
            bench.main(["--kohya", str(tmp_path)])
        run.assert_not_called()


def test_bench_tables_put_the_fp8_rank_32_peer_first_and_itemise_the_step_peak(tmp_path, capsys):
    bench = load_tool("bench_memory_sdxl")
    parts = {key: (i + 1) * 2**20 for i, key in enumerate(bench.PART_NAMES)}
    phases = [PhaseEstimate(p, peak, parts, "backward", 0, 0, GiB, 1, 1, "AdamW8bit") for p, peak in ((1, 5 * GiB),
                                                                                                    (2, 6 * GiB))]
    est = Estimate("sdxl-base", 1024, "sdpa", phases, {})
    kohya = [{"rank": r, "fp8_base": f, "peak_bytes": (3 if f else 4) * GiB, "setup_peak_bytes": GiB // 2,
              "latent_caching_peak_bytes": GiB // 4, "text_encoder_caching_peak_bytes": GiB // 2, "parts": parts,
              "peak_during": "forward", "lora_modules": 722, "trainable_params": 2 * 10**6, "notes": []}
             for r, f in SDXL_VARIANTS]
    root = _checkout(tmp_path / "kohya", SD_FILES + SDXL_FILES)
    with mock.patch.object(bench, "run_jobs", lambda jobs, **kw: [est] * len(jobs)), \
            mock.patch.object(bench, "trace_kohya_sdxl", lambda *a, **kw: kohya):
        assert bench.main(["--kohya", str(root), "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| kohya sdxl_train_network.py, rank 32, --fp8_base |")
    assert rows[1].endswith("| 3.00 | 0.50 | 3.00 | - |")
    assert rows[5].startswith("| sdxl-8gb |") and rows[5].endswith("| 5.00 / 6.00 | 1.00 | 6.00 | 2.00 |")
    assert "| part | sdxl-8gb (phase 2) | sdxl-6gb (phase 2) | kohya r32 fp8 | kohya r32 |" in out
    assert "| **step peak** | **6144.0** | **6144.0** | **3072.0** | **4096.0** |" in out
    assert (tmp_path / "out.json").is_file()
