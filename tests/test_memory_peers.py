"""lowmcgm.memory.peers: the side-by-side rows and ratios, the kohya checkout check and flags.

Tracing kohya's step needs a kohya-ss/sd-scripts checkout, which is not part of this repository:
that runs in tools/bench_memory.py --kohya PATH (docs/benchmarks.md), not here.
"""


import pytest

from lowmcgm.errors import UserError
from lowmcgm.memory.peers import (KOHYA_DOC_FLAGS, Figures, check_kohya_checkout, comparison_rows,
                                  kohya_flags)
from tools_loader import load_tool

GiB = 2**30
KOHYA_FILES = ("train_network.py", "networks/lora.py", "library/original_unet.py", "library/train_util.py")


def test_rows_put_peers_first_and_divide_highest_by_each_peers_highest():
    kohya = Figures("kohya", "k", (2 * GiB,), GiB // 2)
    reference = Figures("reference", "r", (15 * GiB, 24 * GiB), GiB)
    # The setup figure is this row's highest: it, not the step peaks, goes into the ratio.
    ours = Figures("4gb", "o", (int(1.5 * GiB), int(1.8 * GiB)), 3 * GiB)
    rows = comparison_rows([ours], [kohya, reference])
    assert [r[0] for r in rows] == ["kohya", "reference", "4gb"]
    assert rows[2] == ["4gb", "o", "1.50 / 1.80", "3.00", "3.00", "1.50", "0.12"]
    assert rows[0][5:] == ["-", "0.08"]  # a peer against itself: no ratio
    assert rows[1][2:] == ["15.00 / 24.00", "1.00", "24.00", "12.00", "-"]


def test_kohya_checkout_is_checked_before_any_trace(tmp_path):
    with pytest.raises(UserError, match="train_network.py, networks/lora.py"):
        check_kohya_checkout(tmp_path)
    for name in KOHYA_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert check_kohya_checkout(tmp_path) == tmp_path.resolve()


def test_kohya_flags_are_the_documented_ones_with_rank_and_resolution():
    flags = kohya_flags(8, 512)
    assert flags[:len(KOHYA_DOC_FLAGS)] == list(KOHYA_DOC_FLAGS)
    assert {"--network_dim=8", "--resolution=512", "--sdpa", "--optimizer_type=AdamW8bit",
            "--mixed_precision=fp16", "--gradient_checkpointing", "--cache_latents"} <= set(flags)


def test_bench_memory_refuses_a_non_kohya_folder_before_tracing(tmp_path):
    bench = load_tool("bench_memory")
    assert set(bench.SIDE_BY_SIDE) <= {label for label, *_ in bench.ROWS}
    assert bench.REFERENCE_LABEL in {label for label, *_ in bench.ROWS}
    with pytest.raises(UserError, match="not a kohya-ss/sd-scripts checkout"):
        bench.main(["--kohya", str(tmp_path)])
