"""tools/behaviour_hashes.py's own logic, on made-up files: what it hashes and what ``--check`` reports.

The recording itself (every family trained and sampled) is the tool's job, not the suite's.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file
from tools_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    yield load_tool("behaviour_hashes")
    del sys.modules["behaviour_hashes"]


def write_outputs(folder: Path, lora_b: torch.Tensor, pixel: int = 0) -> None:
    """A tiny run folder: an artifact (two tensors, metadata naming its folder), a PNG, a JSON file."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lora_A": torch.arange(6, dtype=torch.float32).reshape(2, 3), "lora_B": lora_b},
              folder / "lowmcgm.safetensors", metadata={"out": str(folder)})
    pixels = np.zeros((4, 5, 3), np.uint8)
    pixels[1, 2] = pixel
    info = PngInfo()
    info.add_text("parameters", f"seed 3, written to {folder}")
    Image.fromarray(pixels).save(folder / "p00.png", pnginfo=info)
    (folder / "samples.json").write_text('{\n  "seed": 3\n}\n')


def record_of(tool, work: Path) -> dict:
    clean = tool.make_cleaner((work, "<TMP>"))
    return {"format": tool.FORMAT, "environment": {"torch": "x"},
            "cases": {"train-tiny": {"commands": [{"argv": ["train"], "exit": 0, "stdout": ["done"], "stderr": []}],
                                     "files": tool.hash_outputs(work, ["run"], clean)}}}


def test_safetensors_hashes_are_of_each_tensors_raw_bytes(tool, tmp_path):
    t = torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16)
    save_file({"w": t}, tmp_path / "a.safetensors", metadata={"k": "v"})
    record = tool.hash_safetensors(tmp_path / "a.safetensors")
    assert record["metadata"] == {"k": "v"}
    assert record["tensors"]["w"] == f"BF16 [1, 2] {tool.sha256(t.view(torch.uint8).numpy().tobytes())}"


def test_identical_outputs_in_another_folder_compare_equal(tool, tmp_path):
    write_outputs(tmp_path / "one" / "run", torch.ones(3, 2))
    write_outputs(tmp_path / "two" / "run", torch.ones(3, 2))
    first, second = record_of(tool, tmp_path / "one"), record_of(tool, tmp_path / "two")
    assert first == second  # the folder is <TMP> in metadata, PNG text and lines
    assert first["cases"]["train-tiny"]["files"]["run/lowmcgm.safetensors"]["metadata"] == {"out": "<TMP>/run"}
    assert tool.compare(first, second) == []


def test_a_changed_tensor_pixel_line_and_missing_file_are_each_named(tool, tmp_path):
    write_outputs(tmp_path / "one" / "run", torch.ones(3, 2))
    changed = torch.ones(3, 2)
    changed[2, 1] = 1.0000001  # one bit
    write_outputs(tmp_path / "two" / "run", changed, pixel=1)
    (tmp_path / "two" / "run" / "samples.json").write_text('{\n  "seed": 4\n}\n')
    first, second = record_of(tool, tmp_path / "one"), record_of(tool, tmp_path / "two")
    del second["cases"]["train-tiny"]["files"]["run/samples.json"]
    second["cases"]["train-tiny"]["commands"][0]["stdout"] = ["done", "one more line"]
    report = "\n".join(tool.compare(first, second))
    assert "train-tiny > files > run/lowmcgm.safetensors > tensors > lora_B: \"F32 [3, 2] " in report
    assert "lora_A" not in report
    assert "train-tiny > files > run/p00.png > pixels_sha256" in report
    assert "run/samples.json > lines: only in the recorded baseline" in report
    assert "train-tiny > commands > command 1 > stdout" in report and "+one more line" in report


def test_check_exits_1_on_a_difference_and_0_on_identical(tool, tmp_path, monkeypatch, capsys):
    import json

    write_outputs(tmp_path / "run", torch.ones(3, 2))
    baseline = record_of(tool, tmp_path)
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    now = copy.deepcopy(baseline)
    monkeypatch.setattr(tool, "record", lambda cases, log=None: now)
    assert tool.main(["--check", str(tmp_path / "baseline.json")]) == 0
    now["cases"]["train-tiny"]["commands"][0]["exit"] = 2
    now["environment"]["torch"] = "y"
    assert tool.main(["--check", str(tmp_path / "baseline.json")]) == 1
    out = capsys.readouterr().out
    assert "note: torch x -> y" in out and "command 1 > exit: 0 -> 2" in out and "DIFFERENT: 1 difference" in out


def test_machine_figures_are_masked(tool):
    clean = tool.make_cleaner()
    line = "phase 1 step 3/3 loss 0.0979 (rec 0.0900) 12.25 it/s peak 536 MiB"
    assert clean(line) == "phase 1 step 3/3 loss 0.0979 (rec 0.0900) <RATE> it/s peak <MEMORY>"
