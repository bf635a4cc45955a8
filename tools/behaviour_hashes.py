"""What lowmcgm does, as hashes: the yardstick of a refactor that must change nothing (issue 25).

Runs the real command line (``lowmcgm.cli.main``) on the tiny models of every family (``tiny`` =
SD 1.5, ``tiny-v`` = SD 2.1-768, ``tiny-xl`` = SDXL, all shrunk) and records, per case, what a
user would see: each command's exit code and its stdout/stderr lines, and every file it wrote:
a safetensors file as the sha256 of each tensor's raw bytes (with dtype and shape) plus its JSON
metadata, a PNG as the sha256 of its pixel array plus its text chunks, any other file as its text
lines. Cases: ``lowmcgm --help``, ``--version`` and each subcommand's help; a short training of
each family (3 + 3 steps, with its resume checkpoint) and its sampling with pose masks in each
pose-guidance mode (none, attention, latent); the three exports of each family's artifact;
``lowmcgm run`` (previews, loss curve, samples); a training resumed with more steps; inspect,
import-lora, presets, config-keys; a few refusals (one ``error:`` line, exit 2, nothing written).
All run in this one process, in a temporary folder holding examples/dogcat's photo and masks.

    # record: the baseline tools/behaviour_hashes.json was made so at commit d6e9a66 (torch
    # 2.13.0+cpu, diffusers 0.42.1), in 90 s on 2 CPU cores shared with other work; recorded again
    # when the [sample] section gained the pose guidance rules (issue 26): every pixel and tensor
    # the same, the new settings in help texts, config.toml, samples.json and PNG chunks; and again
    # for issue 27: first checked with the photo still encoded in one batch (only the two new model
    # settings and preset sdxl-6gb differed: no tensor or pixel), then with the photo and its mirror
    # image encoded one at a time (latents within 1e-6: every trained tensor and drawn pixel moves)
    OMP_NUM_THREADS=1 python tools/behaviour_hashes.py --out tools/behaviour_hashes.json
    # after a change: prints what differs (case, file, tensor or line); exit 1 on any difference
    OMP_NUM_THREADS=1 python tools/behaviour_hashes.py --check tools/behaviour_hashes.json

Deterministic by construction: one thread (so float sums add in one order), fixed seeds, temporary
paths written as ``<TMP>``, the terminal width pinned (argparse and rich wrap to it), and what
measures the machine rather than lowmcgm masked in the output lines: training's ``it/s`` and its
``peak`` memory (on a CPU, the process's peak RSS). Python warnings are recorded as ``warning:
Category: message``, without the file and line that a move of code would change. Versions of
Python and the libraries are recorded beside the cases: another torch or diffusers may change the
bits legitimately, so ``--check`` names a version change first. Not covered: ``lowmcgm estimate``
(it traces in a subprocess on fake CUDA, ~20 s a job; tests/test_cli_estimate.py checks it), ``ui``
and ``demo`` (the toy model's few-minute run), ``--events`` logs (their lines hold timings).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dogcat"
FAMILIES = ("tiny", "tiny-v", "tiny-xl")
GUIDANCE_MODES = ("none", "attention", "latent")
EXPORT_FORMATS = ("kohya", "embeddings", "diffusers")
# The subcommands whose --help is recorded: listed here, not read from the parser, so that one the
# refactor drops shows as a difference.
SUBCOMMANDS = ("train", "presets", "config-keys", "inspect", "sample", "run", "demo", "ui", "export",
               "import-lora", "estimate")
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "safetensors", "numpy", "PIL", "accelerate")
FORMAT = "lowmcgm-behaviour-hashes/1"

# What measures the machine, not lowmcgm: masked in the recorded lines.
MACHINE_FIGURES = [
    (re.compile(r"\d+(\.\d+)? it/s"), "<RATE> it/s"),
    (re.compile(r"peak \d+(\.\d+)? [KMG]iB"), "peak <MEMORY>"),
]


# ---------------------------------------------------------------------------------------------
# Hashing what a command wrote


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int], bytes]]]:
    """A safetensors file's metadata and tensors as stored, read with safetensors itself.

    Returns:
        (metadata, {name: (dtype, shape, raw bytes)}): the dtype and shape as the file names them
        (``BF16``, ``F32``), the bytes exactly as the file holds them (safetensors stores tensors
        contiguous and little-endian, as torch holds them here), so a hash of them changes with any
        bit of any tensor.
    """
    import torch
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata() or {}
        for name in fh.keys():
            stored = fh.get_slice(name)
            raw = fh.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            tensors[name] = (stored.get_dtype(), stored.get_shape(), raw)
    return metadata, tensors


def hash_safetensors(path: Path, clean: Any = lambda text: text) -> dict[str, Any]:
    """{"tensors": {name: "DTYPE [shape] sha256"}, "metadata": {key: value}} of a safetensors file.

    One string a tensor, one line in the recorded JSON: a resume checkpoint holds thousands.

    Args:
        clean: applied to each metadata value (temporary paths -> placeholders).
    """
    metadata, tensors = read_safetensors(path)
    return {"tensors": {name: f"{dtype} {list(shape)} {sha256(raw)}"
                        for name, (dtype, shape, raw) in sorted(tensors.items())},
            "metadata": {key: clean(value) for key, value in sorted(metadata.items())}}


def hash_png(path: Path, clean: Any = lambda text: text) -> dict[str, Any]:
    """{"pixels_sha256", "mode", "size", "text"} of a PNG: its decoded pixels, not the file's bytes,
    which a change of zlib or of PIL's encoder would alter with the same image."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.ascontiguousarray(np.asarray(image))
        text = {key: clean(str(value)) for key, value in sorted(getattr(image, "text", {}).items())}
        return {"pixels_sha256": sha256(pixels.tobytes()), "mode": image.mode, "size": list(image.size),
                "text": text}


def hash_file(path: Path, clean: Any = lambda text: text) -> dict[str, Any]:
    """The record of one output file, by its kind: tensors, pixels, or text lines (else raw bytes)."""
    if path.suffix == ".safetensors":
        return hash_safetensors(path, clean)
    if path.suffix == ".png":
        return hash_png(path, clean)
    try:
        return {"lines": clean(path.read_text(encoding="utf-8")).splitlines()}
    except UnicodeDecodeError:
        return {"sha256": sha256(path.read_bytes())}


def hash_outputs(work: Path, outputs: list[str], clean: Any) -> dict[str, Any]:
    """{relative path: record} of every file under each output (a file or a folder) in ``work``;
    an output that is missing is recorded as such."""
    records: dict[str, Any] = {}
    for name in outputs:
        top = work / name
        if not top.exists():  # a refused command must leave nothing: its absence is recorded too
            records[name] = {"missing": True}
        elif top.is_dir():
            for path in sorted(p for p in top.rglob("*") if p.is_file()):
                records[path.relative_to(work).as_posix()] = hash_file(path, clean)
        else:
            records[name] = hash_file(top, clean)
    return records


# ---------------------------------------------------------------------------------------------
# Running the command line and capturing what it says


def pin_environment() -> None:
    """What the recording must not take from the machine; called before torch loads.

    One thread makes every reduction add in one order (bit-identical results), and two threads
    each on 2 shared cores only slow each other down (tests/conftest.py). argparse and rich wrap to
    the terminal's width: COLUMNS pins it. FORCE_COLOR and TTY_* would make rich draw a live display
    (or colour) into the captured output.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["COLUMNS"] = "100"
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        os.environ.pop(name, None)


def make_cleaner(*places: tuple[Path, str]) -> Any:
    """A function that writes each (path, placeholder) as the placeholder and masks machine figures."""
    pairs = [(str(path), placeholder) for path, placeholder in places]
    pairs += [(str(path.resolve()), placeholder) for path, placeholder in places if str(path.resolve()) != str(path)]

    def clean(text: str) -> str:
        for path, placeholder in pairs:
            text = text.replace(path, placeholder)
        for pattern, replacement in MACHINE_FIGURES:
            text = pattern.sub(replacement, text)
        return text

    return clean


@contextlib.contextmanager
def recorded_warnings(stream: io.StringIO) -> Iterator[None]:
    """Python warnings written to ``stream`` as ``warning: Category: message``: without the file and
    line of the code that warned, which moving code changes. A fresh filter state per command
    (``catch_warnings`` resets the once-per-place registry), so each shows as in its own process."""
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 (warnings' signature)
        stream.write(f"warning: {category.__name__}: {message}\n")

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def run_cli(argv: list[str], clean: Any) -> dict[str, Any]:
    """Run ``lowmcgm.cli.main(argv)``; {"argv", "exit", "stdout", "stderr"} with lines cleaned.

    argparse's ``--help`` ends in SystemExit, as the installed command would exit: its code is kept.
    """
    from lowmcgm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), recorded_warnings(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return {"argv": [clean(a) for a in argv], "exit": code, "stdout": clean(out.getvalue()).splitlines(),
            "stderr": clean(err.getvalue()).splitlines()}


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    """Commands run in order in the work folder, and the outputs (files or folders) then hashed."""

    name: str
    commands: list[list[str]]
    outputs: list[str] = field(default_factory=list)


INPUTS = ["--image", "photo.png", "--mask", "dog.png", "--mask", "cat.png", "--init-word", "dog", "--init-word", "cat"]
# Three steps a phase: enough for both phases' optimizers and LoRA to move every trained weight; a
# checkpoint every 2 steps leaves checkpoints/last.safetensors (the resume state, written only
# before a phase's last step) from phase 2's step 2 to hash too.
SHORT_TRAINING = ["--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3", "--set", "train.seed=1",
                  "--set", "train.checkpoint_every=2"]
# Poses swapped (the dog where the cat was): guidance has something to pull.
SAMPLING = ["--prompt", "a photo of <asset0> and <asset1> on the beach", "--pose", "asset0=cat.png",
            "--pose", "asset1=dog.png", "--num-images", "1", "--seed", "3"]


def help_cases() -> list[Case]:
    helps = [["--help"], ["--version"]] + [[name, "--help"] for name in SUBCOMMANDS]
    return [Case("help", helps)]


def family_cases(family: str) -> list[Case]:
    """A short training on ``family``, its sampling in each guidance mode, and its three exports."""
    train = f"train-{family}"
    artifact = f"{train}/lowmcgm.safetensors"
    cases = [Case(train, [["train", "--preset", "tiny-cpu", "--base-model", family, *INPUTS, *SHORT_TRAINING,
                           "--out", train]], [train])]
    for mode in GUIDANCE_MODES:
        out = f"sample-{family}-{mode}"
        cases.append(Case(out, [["sample", "--artifact", artifact, *SAMPLING, "--steps", "4", "--guidance", mode,
                                 "--out", out]], [out]))
    for fmt in EXPORT_FORMATS:
        out = f"export-{family}-{fmt}" + (".safetensors" if fmt == "kohya" else "")
        cases.append(Case(f"export-{family}-{fmt}", [["export", artifact, "--format", fmt, "--out", out]], [out]))
    return cases


def other_cases() -> list[Case]:
    """``lowmcgm run``, a resumed training, the read-only commands, and refusals: one ``error:`` line
    each, exit 2."""
    artifact = "train-tiny/lowmcgm.safetensors"
    train = ["train", "--preset", "tiny-cpu", "--base-model", "tiny", *INPUTS, *SHORT_TRAINING, "--out", "resume-tiny"]
    # Raising the step count on --resume is allowed (README): phase 2 goes on from its step-2 checkpoint.
    resumed = [*train, "--set", "train.phase2_steps=5", "--resume"]
    run = ["run", "--preset", "tiny-cpu", "--base-model", "tiny", *INPUTS, *SHORT_TRAINING, "--preview-every", "1",
           *SAMPLING, "--steps", "3", "--out", "run-tiny"]
    refusals = [
        ["train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", "photo.png", "--out", "refused"],
        ["train", "--preset", "tiny-cpu", *INPUTS, "--set", "train.lr=1", "--out", "refused"],
        ["sample", "--artifact", artifact, "--prompt", "a photo of <asset0>", "--base-model", "tiny-v",
         "--out", "refused"],
        ["sample", "--artifact", artifact, "--prompt", "a photo of <asset0>", "--guidance", "sideways",
         "--out", "refused"],
        ["sample", "--artifact", artifact, "--prompt", "a photo of <asset0>", "--pose", "asset7=cat.png",
         "--out", "refused"],
    ]
    return [
        Case("run-tiny", [run], ["run-tiny"]),
        Case("resume-tiny", [train, resumed], ["resume-tiny"]),
        Case("inspect", [["inspect", artifact], ["inspect", "--json", artifact],
                         ["import-lora", "export-tiny-kohya.safetensors"],
                         ["import-lora", "export-tiny-xl-kohya.safetensors"]]),
        Case("listings", [["presets"], ["config-keys"]]),
        Case("refusals", refusals, ["refused"]),
    ]


def all_cases() -> list[Case]:
    """Every case, in the order they run (inspect and refusals read the trainings' artifacts)."""
    return help_cases() + [c for family in FAMILIES for c in family_cases(family)] + other_cases()


def run_case(case: Case, work: Path, clean: Any) -> dict[str, Any]:
    commands = [run_cli(argv, clean) for argv in case.commands]
    return {"commands": commands, "files": hash_outputs(work, case.outputs, clean)}


def environment() -> dict[str, str]:
    """The versions that may change the bits legitimately (a new torch kernel, a new scheduler)."""
    import importlib

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(ImportError):
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    return versions


def record(cases: list[Case], log: Any = None) -> dict[str, Any]:
    """Run ``cases`` in a fresh temporary folder holding the example photo; the whole record."""
    import torch

    torch.set_num_threads(1)  # also where torch ignored OMP_NUM_THREADS
    result: dict[str, Any] = {"format": FORMAT, "environment": environment(), "cases": {}}
    old_cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="lowmcgm-hashes-") as tmp:
        work = Path(tmp)
        for name in ("photo.png", "dog.png", "cat.png"):
            shutil.copy(EXAMPLE / name, work / name)
        clean = make_cleaner((work, "<TMP>"), (ROOT, "<REPO>"), (Path.home(), "<HOME>"))
        # Relative paths in the commands: what they print does not depend on where the folder is.
        os.chdir(work)
        try:
            for case in cases:
                start = time.perf_counter()
                result["cases"][case.name] = run_case(case, work, clean)
                if log:
                    log(f"{case.name}: {time.perf_counter() - start:.1f} s")
        finally:
            os.chdir(old_cwd)
    return result


# ---------------------------------------------------------------------------------------------
# Comparing two records


def flatten(value: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: leaf}: dicts are walked, lists of strings (output lines) and other lists are leaves;
    a list of dicts (a case's commands) is walked by index."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = ((f"command {i + 1}", v) for i, v in enumerate(value))
    else:
        return {path: value}
    flat: dict[tuple[str, ...], Any] = {}
    for key, child in items:
        flat.update(flatten(child, (*path, str(key))))
    return flat


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between two records, one readable entry each; [] when the cases are identical.

    Output lines differ as a unified diff; a tensor, pixels or a value as ``old -> new``; what only
    one record holds as ``only in ...``. Environment differences come first, marked ``note:``
    (they do not fail a check themselves, but explain why bits might differ).
    """
    notes = [f"note: {key} {old} -> {actual['environment'].get(key)}"
             for key, old in expected.get("environment", {}).items()
             if actual.get("environment", {}).get(key) != old]
    old, new = flatten(expected["cases"]), flatten(actual["cases"])
    problems = []
    for path in sorted(old.keys() | new.keys()):
        where = " > ".join(path)
        if path not in new:
            problems.append(f"{where}: only in the recorded baseline")
        elif path not in old:
            problems.append(f"{where}: new (not in the recorded baseline)")
        elif old[path] != new[path]:
            problems.append(describe_change(where, old[path], new[path]))
    return notes + problems if problems else []


def describe_change(where: str, old: Any, new: Any) -> str:
    if isinstance(old, list) and isinstance(new, list) and all(isinstance(v, str) for v in old + new):
        diff = difflib.unified_diff(old, new, "recorded", "now", lineterm="", n=1)
        return f"{where}:\n    " + "\n    ".join(diff)
    return f"{where}: {json.dumps(old)} -> {json.dumps(new)}"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", type=Path, help="record the hashes into this JSON file")
    action.add_argument("--check", type=Path, help="recompute and compare with this recorded JSON file")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    import lowmcgm

    log(f"lowmcgm from {Path(lowmcgm.__file__).parent}")
    start = time.perf_counter()
    result = record(all_cases(), log)
    log(f"total: {time.perf_counter() - start:.1f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        log(f"recorded {len(result['cases'])} cases in {args.out}")
        return 0
    differences = compare(json.loads(args.check.read_text(encoding="utf-8")), result)
    for line in differences:
        print(line)
    if differences:
        count = sum(not line.startswith("note:") for line in differences)
        print(f"DIFFERENT: {count} difference{'s' * (count != 1)} from {args.check}")
        return 1
    print(f"identical to {args.check} ({len(result['cases'])} cases)")
    return 0


if __name__ == "__main__":
    pin_environment()  # here, not at import: the test suite imports this module and keeps its own settings
    # The lowmcgm of this checkout, not one installed from another (a worktree shares its venv).
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
