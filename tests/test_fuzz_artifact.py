"""Untrusted files: artifacts and LoRAs come from strangers.

- Nothing in the package unpickles (a source scan).
- Damaged and forged files (random bytes, truncations, oversized or lying headers, wrong dtypes,
  shapes that disagree with the metadata, random metadata) fed to ``load_artifact``, to export's
  ``read_lora_file`` and to ``lowmcgm inspect`` end in a UserError (exit 2) or a clean read, never
  another exception; safetensors' loader is only reached for files whose header was checked, and
  then never allocates more than the file holds.
- Handle names and metadata from an artifact are data: no format-string use, no path use, no markup.

Hypothesis runs derandomized with modest example counts, so CI sees the same cases every time.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lowmcgm
from lowmcgm import artifact as artifact_mod
from lowmcgm.interop import lora_import as export_mod
from lowmcgm.artifact import load_artifact, save_artifact
from lowmcgm.cli import EXIT_USER_ERROR, main
from lowmcgm.config import LoraConfig
from lowmcgm.errors import UserError
from lowmcgm.interop.lora_import import check_init_lora, read_lora_file, summarize_lora

FUZZ = settings(derandomize=True, deadline=None, max_examples=120, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # capsys: read and discarded
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# ------------------------------------------------------------------------------------------------
# Nothing is unpickled
# ------------------------------------------------------------------------------------------------

UNPICKLING = [
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b", re.M), "a pickle module"),
    (re.compile(r"\bpickle\.(load|loads|Unpickler)\b"), "pickle.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"use_safetensors\s*=\s*False"), "use_safetensors=False"),
]


def test_nothing_in_the_package_unpickles():
    files = sorted(Path(lowmcgm.__file__).parent.rglob("*.py"))
    assert len(files) > 15
    found = [f"{path.name}: {what}" for path in files for pattern, what in UNPICKLING
             if pattern.search(path.read_text())]
    assert not found, found
    # The scan itself can fail:
    assert UNPICKLING[0][0].search("x = torch.load(f, map_location='cpu')")
    assert not UNPICKLING[0][0].search("x = torch.load(f, weights_only=True)")


# ------------------------------------------------------------------------------------------------
# The loader is reached only for checked files (spy on safetensors' load_file)
# ------------------------------------------------------------------------------------------------

def _oracle_ok(path: str) -> bool:
    """An independent reading of the safetensors layout: tensors tile the data exactly."""
    blob = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    header.pop("__metadata__", None)
    spans = []
    for entry in header.values():
        numel = 1
        for d in entry["shape"]:
            numel *= d
        start, end = entry["data_offsets"]
        if end - start != numel * DTYPE_BYTES[entry["dtype"]]:
            return False
        spans.append((start, end))
    covered = 0
    for start, end in sorted(spans):
        if start != covered:
            return False
        covered = end
    return covered == len(blob) - 8 - length  # what is allocated is exactly what the file holds


@pytest.fixture(scope="module", autouse=True)
def spy_on_loader():
    calls: list[str] = []
    patched = []
    for module in (artifact_mod, export_mod):
        real = module.load_file

        def checked(path, *args, _real=real, **kwargs):
            calls.append(str(path))
            assert _oracle_ok(str(path)), f"load_file reached with an unchecked file {path}"
            return _real(path, *args, **kwargs)

        patched.append((module, real))
        module.load_file = checked
    yield calls
    for module, real in patched:
        module.load_file = real


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real artifact of the tiny model, one step per phase."""
    folder = tmp_path_factory.mktemp("trained")
    photo, a, b = make_photo(folder)
    assert main(["train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", photo, "--mask", a, "--mask", b,
                 "--out", str(folder / "run"), "--set", "train.phase1_steps=1", "--set", "train.phase2_steps=1",
                 "--set", "train.checkpoint_every=0"]) == 0
    return folder / "run" / "lowmcgm.safetensors"


def _only_user_errors(path: Path, capsys) -> None:
    """Every reader of untrusted files on ``path``: a clean result or a UserError, nothing else."""
    for read in (load_artifact, read_lora_file, summarize_lora, lambda p: check_init_lora(p, LoraConfig())):
        try:
            read(path)
        except UserError:
            pass
    for extra in ([], ["--json"]):
        assert main(["inspect", str(path), *extra]) in (0, EXIT_USER_ERROR)
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------

NAMES = st.sampled_from([
    "handles.vectors", "mask_encoder.proj.weight", "mask_encoder.proj.bias", "unet.a.to_q.lora_A.weight",
    "unet.a.to_q.lora_B.weight", "text_encoder.b.q_proj.lora_A.weight", "lora_unet_a_to_q.lora_down.weight",
    "lora_unet_a_to_q.lora_up.weight", "lora_unet_a_to_q.alpha", "bundle_emb.<x>.string_to_param.*",
    "string_to_param.*", "other", "unet.a.to_q.weight", "__metadata__",
]) | st.text(max_size=12)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=8)
DTYPES = st.sampled_from(list(DTYPE_BYTES) + ["F8_E4M3", "U16", "f32", ""]) | JSONISH
SHAPES = st.lists(st.integers(0, 6), max_size=4) | st.lists(st.integers(-2**65, 2**65), max_size=3) | JSONISH


@st.composite
def metadata(draw) -> dict[str, str]:
    """lowmcgm-like metadata with any field replaced by junk."""
    good = {"format": "lowmcgm", "format_version": "1", "handles": json.dumps(["<asset0>"]), "text_width": "4",
            "mask_size": "2", "lora": json.dumps({"mode": "lora", "rank": 1, "alpha": 1.0, "unet_targets": ["to_q"]}),
            "base_model_version": "sd_v1", "resolution": "64", "training_config": "{}",
            "ss_base_model_version": "sd_v1", "lora_adapter_metadata": json.dumps({"unet.lora_alpha": 1})}
    for key in draw(st.lists(st.sampled_from(sorted(good)), unique=True, max_size=4)):
        good[key] = draw(st.text(max_size=20) | JSONISH.map(json.dumps))
    return good


@st.composite
def forged_files(draw) -> bytes:
    """A header of entries that may lie about dtype, shape and offsets, then some data bytes."""
    entries = {}
    for name in draw(st.lists(NAMES, max_size=5, unique=True)):
        entry = {"dtype": draw(DTYPES), "shape": draw(SHAPES)}
        if draw(st.booleans()):  # consistent offsets for the claimed shape, placed after the others
            start = sum(e.get("_size", 0) for e in entries.values() if isinstance(e, dict))
            numel = 1
            for d in entry["shape"] if isinstance(entry["shape"], list) else []:
                numel *= d if isinstance(d, int) else 1
            size = numel * DTYPE_BYTES.get(entry["dtype"], 1) if isinstance(entry["dtype"], str) else 0
            entry["data_offsets"], entry["_size"] = [start, start + size], size
        else:
            entry["data_offsets"] = draw(st.lists(st.integers(-5, 2**64), max_size=3) | JSONISH)
        entries[name] = entry
    for entry in entries.values():
        entry.pop("_size", None)
    header = {"__metadata__": draw(metadata())} if draw(st.booleans()) else {}
    header.update(entries)
    blob = json.dumps(header).encode()
    data_len = draw(st.integers(0, 256))
    claimed = draw(st.sampled_from([len(blob), len(blob) + 1, len(blob) - 1, 2**63, 2**40, 0]))
    return struct.pack("<Q", max(claimed, 0)) + blob + bytes(data_len)


@st.composite
def real_tensors(draw) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Well-formed safetensors files whose names, dtypes and shapes are anything."""
    tensors = {}
    for name in draw(st.lists(NAMES.filter(lambda n: n != "__metadata__" and n), max_size=5, unique=True)):
        shape = draw(st.lists(st.integers(0, 3), max_size=4))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8]))
        tensors[name] = torch.ones(shape, dtype=dtype) if dtype != torch.bool else torch.zeros(shape, dtype=dtype)
    return tensors, draw(metadata())


SMALL_SHAPES = st.lists(st.integers(0, 3), max_size=4)
TORCH_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])


def _tensor(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype) if dtype == torch.bool else torch.full(shape, 2, dtype=dtype)


@st.composite
def lora_like_files(draw) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya, diffusers or lowmcgm layouts (the readers' paths), each part of any shape and dtype."""
    layout = draw(st.sampled_from(["kohya", "diffusers", "lowmcgm"]))
    parts = {"kohya": ("lora_unet_{m}.lora_down.weight", "lora_unet_{m}.lora_up.weight", "lora_unet_{m}.alpha",
                       "lora_te_text_model_{m}.lora_down.weight", "bundle_emb.<h>.string_to_param.*"),
             "diffusers": ("unet.{m}.lora_A.weight", "unet.{m}.lora_B.weight", "text_encoder.{m}.lora_A.weight"),
             "lowmcgm": ("unet.{m}.lora_A.weight", "unet.{m}.lora_B.weight", "handles.vectors",
                         "mask_encoder.proj.weight", "mask_encoder.proj.bias")}[layout]
    tensors = {}
    for module in draw(st.lists(st.sampled_from(["a_to_q", "b.attn2.to_k", "c"]), min_size=1, max_size=2, unique=True)):
        for pattern in parts:
            if draw(st.integers(0, 9)):  # most parts present, some missing
                tensors[pattern.format(m=module)] = _tensor(draw(SMALL_SHAPES), draw(TORCH_DTYPES))
    meta = draw(metadata())
    if layout != "lowmcgm":
        meta.pop("format", None)
    return tensors, meta


# ------------------------------------------------------------------------------------------------
# Fuzz tests
# ------------------------------------------------------------------------------------------------

@FUZZ
@given(blob=st.binary(max_size=300))
def test_random_bytes(workdir, capsys, blob):
    path = workdir / "random.safetensors"
    path.write_bytes(blob)
    _only_user_errors(path, capsys)


@FUZZ
@given(blob=forged_files())
def test_forged_headers(workdir, capsys, blob):
    """Oversized, lying and malformed headers; shapes and offsets that disagree with the data."""
    path = workdir / "forged.safetensors"
    path.write_bytes(blob)
    _only_user_errors(path, capsys)


@FUZZ
@given(case=real_tensors())
def test_well_formed_files_of_any_content(workdir, capsys, case):
    """Valid safetensors with wrong dtypes, wrong shapes, missing or extra tensors, junk metadata."""
    tensors, meta = case
    path = workdir / "wellformed.safetensors"
    save_file(tensors, str(path), metadata=meta)
    _only_user_errors(path, capsys)


@FUZZ
@given(case=lora_like_files())
def test_lora_files_of_any_shape(workdir, capsys, case):
    """kohya, diffusers and lowmcgm layouts whose parts have any shape and dtype (scalar alphas that
    are not, 0-d or 1-d weights, down and up that do not fit), with junk metadata."""
    tensors, meta = case
    path = workdir / "lora.safetensors"
    save_file(tensors, str(path), metadata=meta)
    _only_user_errors(path, capsys)


@settings(derandomize=True, deadline=None, max_examples=60, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), max_size=3),
       tail=st.binary(max_size=16))
def test_damaged_copies_of_a_real_artifact(trained, workdir, capsys, cut, flips, tail):
    """Truncated at any point, bytes flipped (header or data), bytes appended."""
    blob = bytearray(trained.read_bytes())
    for where, value in flips:
        index = min(int(where * len(blob)), len(blob) - 1)
        blob[index] ^= value
    blob = bytes(blob[: max(1, int(cut * len(blob)))] if cut < 1.0 else blob) + tail
    path = workdir / "damaged.safetensors"
    path.write_bytes(blob)
    _only_user_errors(path, capsys)


def test_the_spy_saw_valid_files(trained, spy_on_loader):
    """The spy is live: the real artifact reaches the loader and loads."""
    before = len(spy_on_loader)
    assert load_artifact(trained).handles == ["<asset0>", "<asset1>"]
    assert len(spy_on_loader) == before + 1


@pytest.mark.parametrize("case,fragment", [
    ("oversized header", "header of"),
    ("shape lies about the data", "claims a size"),
    ("shape lies about the metadata", "handles.vectors must be"),
    ("gap between tensors", "overlap or leave gaps"),
    ("bytes after the data", "after the last tensor"),
    ("repeated key", "unreadable header"),
    ("deeply nested header", "unreadable header"),
    ("wrong dtype", "has dtype I64"),
    ("lora rank not a number", "positive whole rank"),
])
def test_named_forgeries_are_refused_before_loading(workdir, spy_on_loader, case, fragment):
    meta = {"format": "lowmcgm", "format_version": "1", "handles": json.dumps(["<a>"]), "text_width": "2"}
    vec = {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}
    header: dict = {"__metadata__": meta, "handles.vectors": vec}
    data = bytes(8)
    raw = None
    if case == "oversized header":
        raw = struct.pack("<Q", 2**62) + b"{}"
    elif case == "shape lies about the data":
        header["handles.vectors"] = vec | {"shape": [1000, 2]}
    elif case == "shape lies about the metadata":
        header["handles.vectors"] = vec | {"shape": [2, 1], "data_offsets": [0, 8]}
    elif case == "gap between tensors":
        header["handles.vectors"] = vec | {"data_offsets": [4, 12]}
        data = bytes(12)
    elif case == "bytes after the data":
        data = bytes(16)
    elif case == "repeated key":
        text = json.dumps(header)[:-1] + ', "handles.vectors": ' + json.dumps(vec) + "}"
        raw = struct.pack("<Q", len(text)) + text.encode() + data
    elif case == "deeply nested header":
        text = "[" * 100_000 + "]" * 100_000
        raw = struct.pack("<Q", len(text)) + text.encode()
    elif case == "wrong dtype":
        header["handles.vectors"] = vec | {"dtype": "I64", "shape": [1, 1]}
    elif case == "lora rank not a number":
        meta["lora"] = json.dumps({"rank": "4", "alpha": 4.0})
        header["unet.a.lora_A.weight"] = {"dtype": "F32", "shape": [0, 2], "data_offsets": [8, 8]}
    if raw is None:
        text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + data
    path = workdir / "named.safetensors"
    path.write_bytes(raw)
    before = len(spy_on_loader)
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_artifact(path)
    assert len(spy_on_loader) == before, "the tensors were read before the header was refused"


# ------------------------------------------------------------------------------------------------
# Handle names and metadata are data
# ------------------------------------------------------------------------------------------------

HOSTILE = ["{0}", "../x", "%s", "<a/b>", "<..>", "<{0}>", "<[/bold]>"]


@pytest.fixture(scope="module")
def hostile_names(trained, tmp_path_factory) -> Path:
    """The real artifact with format strings, path separators and markup as handle names."""
    art = load_artifact(trained)
    art.handles = ["../x", "{0}"]
    path = tmp_path_factory.mktemp("hostile") / "names.safetensors"
    save_artifact(art, path, dtype="fp32")
    return path


@pytest.fixture(scope="module")
def hostile_meta(trained, tmp_path_factory) -> Path:
    """Valid handles; every free-text field holds format strings, paths and rich markup."""
    art = load_artifact(trained)
    junk = "{0} {x} %s %(a)s ../../etc/passwd /tmp/x [/bold] [link=file:///etc]y[/link]\nnext line"
    art.meta.update(base_model=junk, init_words=["{0}", "../x", "%s"], lowmcgm_version=junk,
                    training_config={"data": {"image": junk}})
    path = tmp_path_factory.mktemp("hostile") / "meta.safetensors"
    save_artifact(art, path, dtype="fp32")
    return path


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_handle_names_are_refused(trained, workdir, name):
    art = load_artifact(trained)
    art.handles = [name, "<asset1>"]
    path = workdir / "hostile-name.safetensors"
    save_artifact(art, path)
    with pytest.raises(UserError, match="handle name"):
        load_artifact(path)


def test_hostile_names_refused_by_every_command(hostile_names, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    commands = [["inspect", str(hostile_names)], ["inspect", str(hostile_names), "--json"],
                ["export", str(hostile_names), "--format", "embeddings", "--out", str(out)],
                ["export", str(hostile_names), "--format", "kohya", "--out", str(out / "l.safetensors")],
                ["import-lora", str(hostile_names)],
                ["sample", "--artifact", str(hostile_names), "--prompt", "a photo", "--base-model", "tiny",
                 "--out", str(out)]]
    for args in commands:
        assert main(args) == EXIT_USER_ERROR, args
        err = capsys.readouterr().err
        assert "handle name '../x'" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.rglob("*")) == [], "something was written"
    assert not (tmp_path.parent / "x.safetensors").exists()


def test_hostile_metadata_is_shown_and_exported_as_plain_data(hostile_meta, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps table cells at the terminal's width
    assert main(["inspect", str(hostile_meta)]) == 0
    shown = capsys.readouterr().out
    assert "[/bold]" in shown and "[link=file:///etc]y[/link]" in shown  # printed, not interpreted
    assert main(["inspect", str(hostile_meta), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["init_words"] == ["{0}", "../x", "%s"] and data["base_model"].startswith("{0} {x} %s")
    out = tmp_path / "emb"
    assert main(["export", str(hostile_meta), "--format", "embeddings", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["asset0.safetensors", "asset1.safetensors", "emb"]
    assert main(["export", str(hostile_meta), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert main(["export", str(hostile_meta), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert written == {"emb", "emb/asset0.safetensors", "emb/asset1.safetensors", "k.safetensors", "d",
                       "d/pytorch_lora_weights.safetensors", "d/learned_embeds.safetensors"}
    capsys.readouterr()


def test_hostile_metadata_and_prompt_sample_as_data(hostile_meta, tmp_path, capsys):
    """The recorded base model is junk: without --base-model it is refused in one line; with one, the
    junk and a prompt full of format fields travel into the PNGs as text, and file names stay ours."""
    out = tmp_path / "samples"
    prompt = "a photo of <asset0> {0} %s ../../x [/bold]"
    args = ["sample", "--artifact", str(hostile_meta), "--prompt", prompt, "--steps", "1", "--num-images", "1",
            "--out", str(out)]
    assert main(args) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "cannot be loaded from here" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(args + ["--base-model", "tiny"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p00-000-seed0.png", "samples.json"]
    index = json.loads((out / "samples.json").read_text())
    assert index["prompts"][0]["prompt"] == prompt
