"""One table of precision names: config, CLI and torch agree."""

from __future__ import annotations

import torch

from lowmcgm.cli import build_parser
from lowmcgm.config import CHOICES
from lowmcgm.models.dtypes import DTYPE_NAMES, precision_dtype, torch_dtype


def test_every_name_has_its_torch_dtype_and_no_means_fp32():
    assert [torch_dtype(n) for n in DTYPE_NAMES] == [torch.float16, torch.bfloat16, torch.float32]
    assert precision_dtype("no") == torch.float32 and precision_dtype("bf16") == torch.bfloat16


def test_config_and_sample_flag_take_the_same_names():
    assert tuple(CHOICES["output.save_dtype"]) == DTYPE_NAMES
    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    dtype = next(a for a in sample._actions if a.dest == "dtype")
    assert tuple(dtype.choices) == DTYPE_NAMES


def test_sample_dtype_takes_the_same_names_or_empty_for_automatic():
    from lowmcgm.config import config_field

    assert config_field("sample.dtype")[0].metadata["choices"] == ("", *DTYPE_NAMES)
