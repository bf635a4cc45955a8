"""Every bad input of issue 4 through the real ``lowmcgm`` entry point.

Each refused case must exit with code 2, print one line on stderr that names the problem (and,
where there is one, the fix), show no traceback, and leave nothing behind: no artifact, no partial
file, and no output folder that the run created. The cases run in-process through
``lowmcgm.cli.main`` (fast); two run as real subprocesses to prove the installed entry point.
Cases that must *work* (overlapping masks warn, 16-bit and palette PNG masks) train the tiny model
for one step per phase.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_photo
from PIL import Image
from safetensors.torch import save_file

from lowmcgm.cli import EXIT_USER_ERROR, main
from lowmcgm.data import load_mask
from lowmcgm.training import trainer
from lowmcgm.training.recipe import TrainingRecipe

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
SIZE = 96  # conftest's photo is 96 x 96
ONE_STEP_EACH = ["--set", "train.phase1_steps=1", "--set", "train.phase2_steps=1", "--set", "train.checkpoint_every=0"]


# ------------------------------------------------------------------------------------------------
# Inputs: conftest's photo and masks, and one file per kind of damage
# ------------------------------------------------------------------------------------------------

def _palette_mask(binary: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """A 'P' image whose index 1 has ``colour`` (a segmentation tool's label map), index 0 black."""
    img = Image.fromarray(binary.astype(np.uint8), mode="L").convert("P")
    img.putpalette([0, 0, 0, *colour] + [0, 0, 0] * 254)
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    photo, a, b = map(Path, make_photo(folder))
    a_bits = np.asarray(Image.open(a)) > 127
    b_bits = np.asarray(Image.open(b)) > 127
    paths = {"photo": photo, "a": a, "b": b}

    def put(name: str, write) -> None:
        paths[name] = folder / name
        write(paths[name])

    put("text.png", lambda p: p.write_text("not an image at all"))
    put("half.png", lambda p: p.write_bytes(a.read_bytes()[: a.stat().st_size // 2]))
    jpeg = folder / "photo.jpg"
    Image.open(photo).save(jpeg, quality=90)
    put("half.jpg", lambda p: p.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2]))
    put("small.png", lambda p: Image.open(a).resize((48, 48), Image.Resampling.NEAREST).save(p))
    put("wide.png", lambda p: Image.new("L", (SIZE, 64), 255).save(p))
    put("empty.png", lambda p: Image.new("L", (SIZE, SIZE), 0).save(p))
    put("full.png", lambda p: Image.new("L", (SIZE, SIZE), 255).save(p))
    put("a16.png", lambda p: Image.fromarray(a_bits.astype(np.uint16) * 65535).save(p))
    put("b_palette.png", lambda p: _palette_mask(b_bits, (255, 255, 255)).save(p))
    # Pascal VOC's first class colour: luminance 38/255, so a luminance reading finds nothing.
    put("b_voc.png", lambda p: _palette_mask(b_bits, (128, 0, 0)).save(p))
    put("a_overlap.png", lambda p: Image.fromarray((a_bits | b_bits).astype(np.uint8) * 255).save(p))
    put("folder", lambda p: p.mkdir())
    put("notsd", lambda p: (p.mkdir(), (p / "model_index.json").write_text("{}")))
    put("lora.safetensors", lambda p: save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(p)))
    put("garbage.safetensors", lambda p: p.write_bytes(os.urandom(64)))
    put("model.ckpt", lambda p: p.write_bytes(b"\x80\x04K\x01."))  # a pickle: never to be opened
    put("bad-key.toml", lambda p: p.write_text("[train]\nlora_rl = 1e-4\n"))
    put("regular-file", lambda p: p.write_text("a file, so no folder can be made under it"))
    assert load_mask(paths["a16.png"]).max() == 1.0 and Image.open(paths["a16.png"]).mode.startswith("I")
    assert Image.open(paths["b_voc.png"]).mode == "P"
    return paths


def _train_args(files: dict[str, Path], out: Path, *, image: str = "photo", masks: tuple[str, ...] = ("a", "b"),
                extra: tuple[str, ...] = ()) -> list[str]:
    args = ["train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", str(files.get(image, image))]
    for mask in masks:
        args += ["--mask", str(files.get(mask, mask))]
    return args + ["--out", str(out), *extra]


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _refused(capsys, args: list[str], fragments: tuple[str, ...], watch: Path) -> str:
    """Run ``args``; check exit 2, one 'error:' line with every fragment, and nothing new under ``watch``."""
    before = _tree(watch)
    code = main(args)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _tree(watch) == before, f"left behind: {sorted(map(str, _tree(watch) - before))}"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# train: photo and masks
# ------------------------------------------------------------------------------------------------

TRAIN_CASES = {
    "image missing": (dict(image="no-such-photo.png"), ("Image not found",)),
    "mask missing": (dict(masks=("a", "no-such-mask.png")), ("Mask not found",)),
    "image is a folder": (dict(image="folder"), ("is a folder, not an image file",)),
    "mask is a folder": (dict(masks=("a", "folder")), ("is a folder, not an image file",)),
    "image not an image": (dict(image="text.png"), ("is not an image PIL can read",)),
    "mask not an image": (dict(masks=("a", "text.png")), ("Mask", "is not an image PIL can read")),
    "image truncated (JPEG)": (dict(image="half.jpg"), ("may be truncated",)),
    "mask truncated (PNG)": (dict(masks=("a", "half.png")), ("Mask", "may be truncated")),
    "mask of another size": (dict(masks=("a", "small.png")), ("is 48x48 but the image is 96x96",
                                                              "resize the mask to 96x96")),
    "mask of another aspect ratio": (dict(masks=("a", "wide.png")), ("is 96x64", "aspect ratio differs",
                                                                     "crop photo and masks the same way")),
    "empty mask": (dict(masks=("a", "empty.png")), ("is empty", "mark the subject in white")),
    "mask covers the whole image": (dict(masks=("a", "full.png")), ("covers the whole image",)),
    "more masks than the preset allows": (dict(masks=("a", "b", "a", "b", "a")),
                                          ("5 masks given", "allows at most 4", "data.max_concepts")),
    "unknown preset": (dict(extra=("--preset", "tiny-cp")),
                       ("Unknown preset 'tiny-cp'", "valid presets:", "8gb", "Did you mean 'tiny-cpu'")),
    "unknown config key (--set)": (dict(extra=("--set", "train.lora_rl=1e-4")),
                                   ("Unknown config key 'train.lora_rl'", "Did you mean 'train.lora_lr'",
                                    "Valid [train] keys:")),
    "unknown config key (--config)": (dict(extra=("--config", "{bad-key.toml}")),
                                      ("Unknown config key 'train.lora_rl'", "Did you mean 'train.lora_lr'")),
    "unknown config section": (dict(extra=("--set", "nosuch.key=1")), ("Valid sections: model, data",)),
    "base model path missing": (dict(extra=("--base-model", "/no/such/model")), ("neither a diffusers folder",)),
    "base model folder not SD": (dict(extra=("--base-model", "{notsd}")),
                                 ("is not a Stable Diffusion model folder", "unet/config.json")),
    "base model file not SD": (dict(extra=("--base-model", "{lora.safetensors}")),
                               ("is not a Stable Diffusion checkpoint",)),
    "base model file not safetensors": (dict(extra=("--base-model", "{garbage.safetensors}")),
                                        ("is not a valid safetensors file",)),
    "base model pickle": (dict(extra=("--base-model", "{model.ckpt}")), ("never unpickles",)),
    "output under a regular file": (dict(extra=("--out", "{regular-file}/run")), ("is not writable",)),
}


@pytest.mark.parametrize("case", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_train_refuses_bad_input(files, tmp_path, capsys, case):
    spec, fragments = case
    extra = tuple(_fill(e, files) for e in spec.get("extra", ()))
    args = _train_args(files, tmp_path / "out", image=spec.get("image", "photo"),
                       masks=spec.get("masks", ("a", "b")), extra=extra)
    _refused(capsys, args, fragments, watch=tmp_path)
    assert files["regular-file"].read_text().startswith("a file")


def _fill(text: str, files: dict[str, Path]) -> str:
    """Replace ``{name}`` by the path of input file ``name``."""
    for name, path in files.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def test_unreadable_mask_says_permission(files, tmp_path, capsys, monkeypatch):
    """chmod 000 does not stop root (tests run as root here): the OS's refusal is simulated instead."""
    real_open = Image.open

    def refuse(path, *args, **kwargs):
        if Path(path).name == "b.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("lowmcgm.data.Image.open", refuse)
    _refused(capsys, _train_args(files, tmp_path / "out"), ("cannot be read (permission denied)",), tmp_path)


# ------------------------------------------------------------------------------------------------
# train: output folder checked before training starts
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def no_weights_load(monkeypatch):
    """Fail the test if the base model is loaded: the refusal must come before that."""
    loads = []
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: loads.append(a) or pytest.fail("weights loaded"))
    return loads


def test_full_disk_is_refused_before_weights_load(files, tmp_path, capsys, monkeypatch, no_weights_load):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50 * 2**20))
    _refused(capsys, _train_args(files, tmp_path / "out"), ("has only 50 MiB free", "at least 200 MiB"), tmp_path)
    assert not no_weights_load


def test_unwritable_folder_is_refused_before_weights_load(files, tmp_path, capsys, monkeypatch, no_weights_load):
    """EACCES from the write test, as a folder without write permission gives a normal user."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    _refused(capsys, _train_args(files, tmp_path / "out"), ("is not writable (Permission denied)",), tmp_path)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="no sysfs")
def test_folder_on_a_filesystem_that_refuses_even_root(files, tmp_path, capsys, no_weights_load):
    """sysfs refuses mkdir to root too: a real kernel refusal, no simulation."""
    _refused(capsys, _train_args(files, Path("/sys/lowmcgm-test-out")), ("is not writable",), tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-555 folder anyway")
def test_read_only_folder_is_refused(files, tmp_path, capsys, no_weights_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(capsys, _train_args(files, locked / "out"), ("is not writable",), tmp_path)
    finally:
        locked.chmod(0o755)


def test_refused_run_keeps_a_folder_the_user_made(files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    _refused(capsys, _train_args(files, out, masks=("a", "empty.png")), ("is empty",), tmp_path)
    assert out.is_dir()


def test_8bit_adamw_failing_its_test_step_is_refused_when_required(files, tmp_path, capsys, monkeypatch,
                                                                  no_weights_load):
    """train.use_adamw_fallback=false: bitsandbytes failing its test step stops the run before weights load."""
    from lowmcgm.training import optimizer

    monkeypatch.setattr(trainer, "training_device", lambda: torch.device("cuda"))  # the probe is replaced
    monkeypatch.setattr(optimizer, "probe_adamw8bit", lambda device: "RuntimeError: CUDA Setup failed")
    extra = ("--set", "train.optimizer=adamw8bit", "--set", "train.use_adamw_fallback=false")
    _refused(capsys, _train_args(files, tmp_path / "out", extra=extra),
             ("train.optimizer = 'adamw8bit' cannot run here (RuntimeError: CUDA Setup failed)",
              "--set train.use_adamw_fallback=true"), tmp_path)
    assert not no_weights_load


def test_run_checks_inputs_before_weights_load(files, tmp_path, capsys, monkeypatch):
    """``lowmcgm run`` loads the base model itself (to train and sample with one copy): after the checks."""
    import lowmcgm.sampling.sampler  # noqa: F401  (imported first, it keeps the real loader it binds at import)

    monkeypatch.setattr("lowmcgm.models.loading.load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    args = _train_args(files, tmp_path / "out", masks=("a", "full.png"))
    _refused(capsys, ["run", *args[1:]], ("covers the whole image",), tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    _refused(capsys, ["run", *_train_args(files, tmp_path / "out")[1:]], ("has only 1 MiB free",), tmp_path)


# ------------------------------------------------------------------------------------------------
# train: what must work
# ------------------------------------------------------------------------------------------------

def test_overlapping_masks_warn_and_train(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_train_args(files, out, masks=("a_overlap.png", "b"), extra=tuple(ONE_STEP_EACH)))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning: Masks" in err and "overlap on 100% of the smaller one" in err
    assert (out / "lowmcgm.safetensors").is_file()


def test_16_bit_and_palette_masks_train(files, tmp_path, capsys):
    for name, original in (("a16.png", "a"), ("b_palette.png", "b"), ("b_voc.png", "b")):
        assert np.array_equal(load_mask(files[name]) > 0.5, load_mask(files[original]) > 0.5), name
    out = tmp_path / "out"
    code = main(_train_args(files, out, masks=("a16.png", "b_voc.png"), extra=tuple(ONE_STEP_EACH)))
    assert code == 0, capsys.readouterr().err
    assert (out / "lowmcgm.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# Tracebacks only with --debug, through the real entry point
# ------------------------------------------------------------------------------------------------

def test_installed_entry_point_one_line_and_debug_traceback(files, tmp_path):
    args = _train_args(files, tmp_path / "out", masks=("a", "empty.png"))
    plain = subprocess.run([sys.executable, "-m", "lowmcgm.cli", *args], capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert plain.returncode == EXIT_USER_ERROR
    assert plain.stderr.strip().startswith("error: Mask") and len(plain.stderr.strip().splitlines()) == 1
    assert "Traceback" not in plain.stderr and plain.stdout == ""
    debug = subprocess.run([sys.executable, "-m", "lowmcgm.cli", "--debug", *args], capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "lowmcgm.errors.UserError: Mask" in debug.stderr
    assert not (tmp_path / "out").exists()


def test_debug_reraises_in_process(files, tmp_path):
    from lowmcgm.errors import UserError

    with pytest.raises(UserError, match="is empty"):
        main(["--debug", *_train_args(files, tmp_path / "out", masks=("a", "empty.png"))])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# sample and export: an artifact from the tiny model
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(files, tmp_path_factory) -> dict[str, Path]:
    """One-step artifacts of the tiny (SD 1.x-like) and tiny-v (SD 2.x-like) models."""
    folder = tmp_path_factory.mktemp("artifacts")
    found = {}
    for base in ("tiny", "tiny-v"):
        args = _train_args(files, folder / base, extra=tuple(ONE_STEP_EACH))
        args[args.index("--base-model") + 1] = base
        assert main(args) == 0
        found[base] = folder / base / "lowmcgm.safetensors"
    return found


def _sample_args(artifact: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--artifact", str(artifact), "--steps", "1", "--num-images", "1", "--out", str(out), *extra]


SAMPLE_CASES = {
    "prompt names a handle the artifact lacks": (("--prompt", "a photo of <asset7>"),
                                                 ("names <asset7>, which this artifact does not have",
                                                  "<asset0>, <asset1>")),
    "pose for a missing handle": (("--prompt", "a photo of <asset0>", "--pose", "asset9={a}"),
                                  ("a pose for <asset9>", "no such handle")),
    "pose file not a mask": (("--prompt", "a photo of <asset0>", "--pose", "asset0={text.png}"),
                             ("Pose for <asset0>", "is not an image")),
    "pose file empty": (("--prompt", "a photo of <asset0>", "--pose", "asset0={empty.png}"), ("is empty",)),
    "pose file missing": (("--prompt", "a photo of <asset0>", "--pose", "asset0=/no/such/pose.png"), ("not found",)),
    "artifact for another base model": (("--prompt", "a photo of <asset0>", "--base-model", "tiny-v"),
                                        ("was made for base model 'tiny'", "pass --base-model tiny")),
    "base model not SD": (("--prompt", "a photo of <asset0>", "--base-model", "{notsd}"),
                          ("is not a Stable Diffusion model folder",)),
}


@pytest.mark.parametrize("case", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_sample_refuses_bad_input(files, artifacts, tmp_path, capsys, case):
    extra, fragments = case
    extra = [_fill(e, files) for e in extra]
    _refused(capsys, _sample_args(artifacts["tiny"], tmp_path / "out", *extra), fragments, tmp_path)


def test_sample_refuses_files_that_are_not_artifacts(files, tmp_path, capsys):
    for artifact, fragment in ((tmp_path / "none.safetensors", "not found"),
                               (files["photo"], "not a valid safetensors"),
                               (files["lora.safetensors"], "not a lowmcgm artifact")):
        _refused(capsys, _sample_args(artifact, tmp_path / "out", "--prompt", "a photo"), (fragment,), tmp_path)


def test_sample_output_under_a_file_is_refused_before_weights_load(files, artifacts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lowmcgm.sampling.sampler.load_base_for", lambda *a: pytest.fail("weights loaded"))
    _refused(capsys, _sample_args(artifacts["tiny"], files["regular-file"] / "out", "--prompt", "a photo of <asset0>"),
             ("is not writable",), tmp_path)


def test_init_lora_from_another_base_model_is_refused_before_training(files, artifacts, tmp_path, capsys, monkeypatch):
    """An artifact of tiny-v (SD 2.x-like) as the starting LoRA of a tiny run: refused before step 1."""
    monkeypatch.setattr(TrainingRecipe, "run_phase", lambda *a: pytest.fail("training started"))
    args = _train_args(files, tmp_path / "out", extra=("--set", f"lora.init_lora={artifacts['tiny-v']}"))
    _refused(capsys, args, ("was made for another base model",), tmp_path)


EXPORT_CASES = {
    "artifact missing": (("none.safetensors", "--format", "kohya", "--out", "{out}/x.safetensors"), ("not found",)),
    "not an artifact": (("{photo}", "--format", "embeddings", "--out", "{out}"), ("not a valid safetensors",)),
    "unknown format": (("{artifact}", "--format", "a1111", "--out", "{out}"), ("Unknown export format 'a1111'",)),
    "kohya to a folder name": (("{artifact}", "--format", "kohya", "--out", "{out}/lora"),
                               ("must name a .safetensors file",)),
    "unknown dtype": (("{artifact}", "--format", "kohya", "--dtype", "fp8", "--out", "{out}/x.safetensors"),
                      ("Unknown export dtype 'fp8'",)),
    "output under a file": (("{artifact}", "--format", "embeddings", "--out", "{file}/emb"),
                            ("Cannot create the output folder",)),
}


@pytest.mark.parametrize("case", EXPORT_CASES.values(), ids=EXPORT_CASES.keys())
def test_export_refuses_bad_input(files, artifacts, tmp_path, capsys, case):
    args, fragments = case
    names = {"out": tmp_path / "out", "photo": files["photo"], "artifact": artifacts["tiny"],
             "file": files["regular-file"]}
    args = [a.format(**names) for a in args]
    if args[0] == "none.safetensors":
        args[0] = str(tmp_path / "none.safetensors")
    _refused(capsys, ["export", *args], fragments, tmp_path)


def test_export_of_an_artifact_without_lora_leaves_no_folder(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(files, out, extra=("--set", "train.phase1_steps=1", "--set", "train.phase2_steps=0",
                                               "--set", "train.checkpoint_every=0"))) == 0
    capsys.readouterr()
    _refused(capsys, ["export", str(out / "lowmcgm.safetensors"), "--format", "kohya", "--out",
                      str(tmp_path / "new" / "lora.safetensors")], ("has no LoRA", "--format embeddings"), tmp_path)


# ------------------------------------------------------------------------------------------------
# Images as viewers show them (issue 13, classes 5 and 6): EXIF orientation, bombs, several frames
# ------------------------------------------------------------------------------------------------

EXIF_ORIENTATION = 0x0112


def _save_sideways(upright: Image.Image, path: Path) -> Path:
    """Store ``upright`` rotated, with the EXIF tag (6: rotate 90 CW to show) that puts it upright again,
    as a phone camera does."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


def test_exif_rotated_square_photo_and_masks_are_read_upright(files, tmp_path, capsys):
    from lowmcgm.data import load_concept_image

    photo = _save_sideways(Image.open(files["photo"]), tmp_path / "photo.png")
    mask = _save_sideways(Image.open(files["a"]), tmp_path / "a.png")
    assert Image.open(photo).size == (SIZE, SIZE) and not np.array_equal(np.asarray(Image.open(photo)),
                                                                        np.asarray(Image.open(files["photo"])))
    upright, _ = load_concept_image(str(files["photo"]), [str(files["a"]), str(files["b"])], 64)
    tagged, _ = load_concept_image(str(photo), [str(mask), str(files["b"])], 64)
    assert torch.equal(upright.image, tagged.image) and torch.equal(upright.masks, tagged.masks)
    out = tmp_path / "out"
    code = main(_train_args(files, out, image=str(photo), masks=(str(mask), "b"), extra=tuple(ONE_STEP_EACH)))
    assert code == 0, capsys.readouterr().err
    assert (out / "lowmcgm.safetensors").is_file()


def test_exif_rotated_wide_photo_matches_masks_drawn_on_what_the_viewer_shows(files, tmp_path, capsys):
    """Stored 64 x 96 with a rotation tag, shown 96 x 64: masks drawn on the shown photo (96 x 64) fit."""
    shown = Image.open(files["photo"]).crop((0, 16, SIZE, 80))  # 96 x 64, both blocks still inside
    photo = _save_sideways(shown, tmp_path / "wide.png")
    masks = []
    for name in ("a", "b"):
        masks.append(tmp_path / f"{name}-wide.png")
        Image.open(files[name]).crop((0, 16, SIZE, 80)).save(masks[-1])
    assert Image.open(photo).size == (64, SIZE)  # as stored: the old reading refused "aspect ratio differs"
    out = tmp_path / "out"
    code = main(_train_args(files, out, image=str(photo), masks=tuple(map(str, masks)), extra=tuple(ONE_STEP_EACH)))
    assert code == 0, capsys.readouterr().err
    assert (out / "lowmcgm.safetensors").is_file()


def test_exif_rotated_pose_mask_is_read_upright(files, tmp_path):
    pose = _save_sideways(Image.open(files["a"]).crop((0, 16, SIZE, 80)), tmp_path / "pose.png")
    assert load_mask(pose).shape == (64, SIZE)
    assert np.array_equal(load_mask(pose) > 0.5, load_mask(files["a"])[16:80] > 0.5)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("odd")
    paths = {"bomb": folder / "bomb.png", "huge": folder / "huge.png"}
    Image.new("1", (20000, 20000)).save(paths["bomb"])  # 48 kB on disk, 400 megapixels declared
    Image.new("1", (9000, 9000)).save(paths["huge"])  # 81 megapixels: under Pillow's bomb limit, over ours
    frames = [Image.new("L", (SIZE, SIZE), v) for v in (0, 255, 0)]
    for name, ext in (("gif", "gif"), ("apng", "png"), ("tiff", "tif")):
        paths[name] = folder / f"animated.{ext}"
        frames[0].save(paths[name], save_all=True, append_images=frames[1:])
    return paths


ODD_IMAGE_CASES = {
    "photo decompression bomb": ("image", "bomb", ("declares more pixels than lowmcgm reads", "downscale it")),
    "mask decompression bomb": ("mask", "bomb", ("Mask", "decompression bomb")),
    "photo over 64 megapixels": ("image", "huge", ("declares 9000x9000 pixels", "downscale it first")),
    "animated GIF mask": ("mask", "gif", ("has 3 frames", "animated or multi-page")),
    "animated PNG mask": ("mask", "apng", ("has 3 frames",)),
    "multi-page TIFF photo": ("image", "tiff", ("Image", "has 3 frames")),
}


@pytest.mark.parametrize("case", ODD_IMAGE_CASES.values(), ids=ODD_IMAGE_CASES.keys())
def test_bombs_and_animations_are_refused(files, odd_images, tmp_path, capsys, case, no_weights_load):
    role, name, fragments = case
    path = str(odd_images[name])
    args = _train_args(files, tmp_path / "out", image=path if role == "image" else "photo",
                       masks=("a", path) if role == "mask" else ("a", "b"))
    _refused(capsys, args, fragments, tmp_path)


def test_animated_pose_mask_is_refused(files, artifacts, odd_images, tmp_path, capsys):
    args = _sample_args(artifacts["tiny"], tmp_path / "out", "--prompt", "a photo of <asset0>",
                        "--pose", f"asset0={odd_images['gif']}")
    _refused(capsys, args, ("Pose for <asset0>", "has 3 frames"), tmp_path)


# ------------------------------------------------------------------------------------------------
# Everything validated before weights load or anything is written (issue 13, classes 7, 8, 10)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_configs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("configs")
    paths = {"config-folder": folder / "conf.d", "config-binary": folder / "model.toml",
             "nan-lora": folder / "nan-lora.safetensors"}
    paths["config-folder"].mkdir()
    paths["config-binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    down = torch.ones(4, 8)
    down[0, 0] = float("nan")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(paths["nan-lora"]))
    return paths


EARLY_CASES = {
    "learning rate NaN": (("--set", "train.lora_lr=nan"), ("train.lora_lr must be a finite number",)),
    "learning rate negative": (("--set", "train.handle_lr=-1"), ("train.handle_lr must be >= 0 (got -1.0)",)),
    "loss weight infinite": (("--set", "loss.attn_weight=inf"), ("loss.attn_weight must be a finite number",)),
    "artifact name empty": (("--set", "output.artifact_name="), ("output.artifact_name must be a plain file name",)),
    "artifact name escapes --out": (("--set", "output.artifact_name=../x.safetensors"),
                                    ("output.artifact_name must be a plain file name", "'../x.safetensors'")),
    "resolution huge": (("--set", "model.resolution=100000"), ("model.resolution must be at most 2048",)),
    "seed beyond 64 bits": (("--set", f"train.seed={2**70}"), ("train.seed must be at most",)),
    "--config is a folder": (("--config", "{config-folder}"), ("is a folder; pass a TOML file",)),
    "--config is a binary file": (("--config", "{config-binary}"), ("is not a TOML text file",)),
    "init_lora with NaN": (("--set", "lora.init_lora={nan-lora}", "--set", "lora.alpha=4"),
                           ("holds NaN/inf values", "lora_unet_down_blocks_0_attentions_0_proj_in")),
    # Issue 23, class C: torch refused these only after config.toml was written, or trained on them.
    "adam beta1 past 1": (("--set", "train.adam_beta1=1.5"), ("train.adam_beta1 must be below 1 (got 1.5)",)),
    "adam beta2 of 1": (("--set", "train.adam_beta2=1"), ("train.adam_beta2 must be below 1 (got 1.0)",)),
    "step count past any run": (("--set", "train.phase1_steps=99999999999999999999"),
                                ("train.phase1_steps must be at most",)),
    "lora alpha negative": (("--set", "lora.alpha=-4"), ("lora.alpha must be > 0 (got -4.0)",)),
}


@pytest.mark.parametrize("case", EARLY_CASES.values(), ids=EARLY_CASES.keys())
def test_settings_are_refused_before_weights_load(files, odd_configs, tmp_path, capsys, case, no_weights_load):
    extra, fragments = case
    extra = tuple(_fill(e, {**files, **odd_configs}) for e in extra)
    _refused(capsys, _train_args(files, tmp_path / "out", extra=extra), fragments, tmp_path)
    assert not no_weights_load


FIT_CASES = {
    "LoRA target typo": (("--set", "lora.unet_targets=to_q,to_kk"),
                         ("lora.unet_targets names 'to_kk'", "did you mean 'to_k'")),
    "text-encoder target typo": (("--set", "lora.use_text_encoder_lora=true", "--set", "lora.text_encoder_targets=qproj"),
                                 ("lora.text_encoder_targets names 'qproj'", "'q_proj'")),
    "resolution not a multiple of the UNet's step": (("--set", "model.resolution=24"), ("multiple of 16",)),
    "resolution beyond the model family": (("--set", "model.resolution=512"), ("is past 128 px, twice the size",)),
}


@pytest.mark.parametrize("case", FIT_CASES.values(), ids=FIT_CASES.keys())
def test_settings_the_model_cannot_take_are_refused_before_anything_is_written(files, tmp_path, capsys, monkeypatch,
                                                                             case):
    """Only checkable once the model is loaded; still before config.toml, and before any training step."""
    monkeypatch.setattr(TrainingRecipe, "run_phase", lambda *a: pytest.fail("training started"))
    extra, fragments = case
    out = tmp_path / "mine"
    out.mkdir()  # a folder the user made stays, and stays empty
    _refused(capsys, _train_args(files, out, extra=extra), fragments, tmp_path)
    assert list(out.iterdir()) == []


def _forged(artifact: Path, folder: Path, **meta: str) -> Path:
    """A copy of ``artifact`` whose metadata says what ``meta`` says (a downloaded, untrusted file)."""
    from safetensors import safe_open

    with safe_open(str(artifact), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = dict(fh.metadata())
    path = folder / f"forged-{len(list(folder.glob('forged-*')))}.safetensors"
    save_file(tensors, str(path), metadata={**metadata, **meta})
    return path


def test_artifact_metadata_numbers_are_range_checked(files, artifacts, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setattr("lowmcgm.sampling.sampler.load_base_for", lambda *a: pytest.fail("weights loaded"))
    cases = [({"resolution": "8192"}, "'resolution' is 8192, outside 0-2048"),
             ({"resolution": str(2**20)}, "'resolution' is 1048576"),
             ({"resolution": "100"}, "not a multiple of 8"),
             ({"mask_size": str(2**20)}, "'mask_size' is 1048576"),
             ({"lora": json.dumps({"mode": "lora", "rank": 2**40, "alpha": 4.0, "unet_targets": []})}, "'lora' needs"),
             ({"training_config": '{"train": {"lora_lr": NaN}}'}, "'training_config' holds a number that is not finite")]
    inputs = tmp_path / "forged"
    inputs.mkdir()
    for meta, fragment in cases:
        forged = _forged(artifacts["tiny"], inputs, **meta)
        _refused(capsys, _sample_args(forged, tmp_path / "out", "--prompt", "a photo of <asset0>"), (fragment,),
                 tmp_path)
        _refused(capsys, ["inspect", str(forged)], (fragment,), tmp_path)


SAMPLE_SETTING_CASES = {
    "guidance scale NaN": (("--guidance-scale", "nan"), ("--guidance-scale must be a finite number",)),
    "guidance scale infinite": (("--guidance-scale", "inf"), ("--guidance-scale must be a finite number",)),
    "seed beyond 64 bits": (("--seed", str(2**70)), ("--seed must be between 0 and",)),
    "height huge": (("--height", "65536"), ("--height must be a positive multiple of 8 up to 2048",)),
    "batch huge": (("--batch-size", "1000000"), ("--batch-size must be between 1 and 256",)),
}


@pytest.mark.parametrize("case", SAMPLE_SETTING_CASES.values(), ids=SAMPLE_SETTING_CASES.keys())
def test_sample_settings_are_refused_before_weights_load(artifacts, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr("lowmcgm.sampling.sampler.load_base_for", lambda *a: pytest.fail("weights loaded"))
    extra, fragments = case
    _refused(capsys, _sample_args(artifacts["tiny"], tmp_path / "out", "--prompt", "a photo of <asset0>", *extra),
             fragments, tmp_path)


# ------------------------------------------------------------------------------------------------
# Nothing destroyed: no command writes over its input, no export replaces a file unasked, one run
# per folder with a lock (issue 13, classes 1 and 2)
# ------------------------------------------------------------------------------------------------

def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def own_artifact(artifacts, tmp_path) -> Path:
    """A copy of the tiny artifact that a test may try to destroy."""
    path = tmp_path / "A.safetensors"
    shutil.copy(artifacts["tiny"], path)
    return path


def test_export_never_writes_over_the_artifact_it_reads(own_artifact, tmp_path, capsys):
    before = _sha(own_artifact)
    os.link(own_artifact, tmp_path / "hardlink.safetensors")
    (tmp_path / "symlink.safetensors").symlink_to(own_artifact)
    for out in (own_artifact, tmp_path / "hardlink.safetensors", tmp_path / "symlink.safetensors",
                tmp_path / "." / own_artifact.name):
        for force in ((), ("--force",)):
            _refused(capsys, ["export", str(own_artifact), "--format", "kohya", "--out", str(out), *force],
                     ("is also an input of this command", "would destroy it"), tmp_path)
    assert _sha(own_artifact) == before


def test_export_replaces_an_existing_file_only_with_force(own_artifact, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"someone's other LoRA")
    _refused(capsys, ["export", str(own_artifact), "--format", "kohya", "--out", str(out)],
             (f"{out} already exists", "pass --force"), tmp_path)
    assert out.read_bytes() == b"someone's other LoRA"
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "asset1.safetensors").write_bytes(b"mine")
    _refused(capsys, ["export", str(own_artifact), "--format", "embeddings", "--out", str(emb)],
             ("asset1.safetensors already exists", "--force"), tmp_path)
    assert sorted(p.name for p in emb.iterdir()) == ["asset1.safetensors"]
    assert main(["export", str(own_artifact), "--format", "kohya", "--out", str(out), "--force"]) == 0
    assert out.read_bytes().startswith(b"\x00") is False and len(out.read_bytes()) > 100


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs")
def test_export_into_a_folder_that_refuses_writes(own_artifact, tmp_path, capsys):
    """sysfs exists and passes os.access for root, yet takes no new file: a real refusal, no simulation."""
    _refused(capsys, ["export", str(own_artifact), "--format", "kohya", "--out", "/sys/kernel/lora.safetensors"],
             ("/sys/kernel is not writable",), tmp_path)
    _refused(capsys, ["export", str(own_artifact), "--format", "embeddings", "--out", "/sys/kernel"],
             ("/sys/kernel is not writable",), tmp_path)


def test_train_never_writes_over_its_config_or_inputs(files, tmp_path, capsys, no_weights_load):
    out = tmp_path / "run"
    out.mkdir()
    config = out / "config.toml"
    config.write_text("# mine\n[train]\nphase1_steps = 1\n")
    _refused(capsys, _train_args(files, out, extra=("--config", str(config))),
             ("config.toml is also an input of this command",), tmp_path)
    photo = out / "previews" / "photo.png"
    photo.parent.mkdir()
    shutil.copy(files["photo"], photo)
    _refused(capsys, _train_args(files, tmp_path / "run", image=str(photo)), ("lies in", "previews"), tmp_path)
    assert config.read_text() == "# mine\n[train]\nphase1_steps = 1\n"


def test_sample_never_removes_a_pose_it_reads(artifacts, files, tmp_path, capsys):
    out = tmp_path / "samples"
    args = _sample_args(artifacts["tiny"], out, "--prompt", "a photo of <asset0>")
    assert main(args) == 0
    capsys.readouterr()
    pose = out / "p00-000-seed0.png"
    shutil.copy(files["a"], pose)
    before = _sha(pose)
    _refused(capsys, args + ["--pose", f"asset0={pose}", "--overwrite"], ("is also an input of this command",),
             tmp_path)
    assert _sha(pose) == before
    prompts = out / "samples.json"
    prompts.write_text("a photo of <asset0>\n")  # a prompts file under the name of the index
    _refused(capsys, _sample_args(artifacts["tiny"], out, "--prompts", str(prompts), "--overwrite"),
             ("samples.json is also an input of this command",), tmp_path)
    assert prompts.read_text() == "a photo of <asset0>\n"


def _one_step(files, out: Path, *extra: str) -> list[str]:
    return _train_args(files, out, extra=(*ONE_STEP_EACH, *extra))


def test_a_folder_holding_another_run_is_refused_unless_resume_or_overwrite(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_one_step(files, out, "--set", "train.checkpoint_every=1", "--set", "train.phase2_steps=2")) == 0
    capsys.readouterr()
    kept = {p: _sha(p) for p in out.rglob("*") if p.is_file()}
    assert out / "checkpoints" / "last.safetensors" in kept and out / "lowmcgm.safetensors" in kept
    _refused(capsys, _one_step(files, out, "--set", "train.seed=7"),
             (f"Output folder {out} holds another run", "lowmcgm.safetensors", "--resume", "--overwrite"), tmp_path)
    _refused(capsys, _one_step(files, out, "--resume", "--overwrite"), ("pass one",), tmp_path)
    assert {p: _sha(p) for p in out.rglob("*") if p.is_file()} == kept
    # --overwrite: the other run's checkpoint does not survive to be resumed by mistake
    assert main(_one_step(files, out, "--set", "train.seed=7", "--overwrite")) == 0
    assert not (out / "checkpoints").exists()
    assert _sha(out / "lowmcgm.safetensors") != kept[out / "lowmcgm.safetensors"]
    assert 'seed = 7' in (out / "config.toml").read_text()
    assert not list(out.rglob(".lowmcgm.lock"))


def test_a_second_command_on_a_folder_in_use_gets_one_line(files, artifacts, tmp_path, capsys):
    """Another process holds the folder's lock (as a running training does): refused, nothing touched."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lowmcgm.runs.folder import hold_folder\n"
         f"with hold_folder({str(out)!r}):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (_one_step(files, out), ["run", *_one_step(files, out)[1:]],
                     _sample_args(artifacts["tiny"], out, "--prompt", "a photo of <asset0>")):
            _refused(capsys, args, (f"Output folder {out} is in use by another lowmcgm command (process "
                                    f"{holder.pid})",), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lowmcgm.lock"]  # the killed holder's, not ours
    assert main(_one_step(files, out)) == 0  # the kernel released the dead holder's lock


def test_sample_into_a_folder_with_earlier_samples(artifacts, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(_sample_args(artifacts["tiny"], out, "--prompt", "a photo of <asset0>") + ["--num-images", "2"]) == 0
    capsys.readouterr()
    before = {p.name: _sha(p) for p in out.iterdir()}
    assert "p00-001-seed1.png" in before
    _refused(capsys, _sample_args(artifacts["tiny"], out, "--prompt", "a photo of <asset1>"),
             ("holds earlier samples", "--overwrite"), tmp_path)
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    assert main(_sample_args(artifacts["tiny"], out, "--prompt", "a photo of <asset1>", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p00-000-seed0.png", "samples.json"]


def test_closed_pipe_ends_quietly(tmp_path):
    """``lowmcgm config-keys | head``: the reader leaves early; no traceback, the shell's code for SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "lowmcgm.cli", "config-keys"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # before the command prints its first line (imports take longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 128 + 13, err
    assert err == ""


# ------------------------------------------------------------------------------------------------
# The 77-token window and long captions (issue 13, class 9)
# ------------------------------------------------------------------------------------------------

LONG = " ".join(["a dog on the beach with a cat"] * 12)  # 96 words, each one token of the tiny tokenizer


def test_handle_past_the_token_window_is_refused(artifacts, tmp_path, capsys):
    _refused(capsys, _sample_args(artifacts["tiny"], tmp_path / "out", "--prompt", "a photo of <asset1>",
                                  "--prompt", f"{LONG} and <asset0>"),
             ("--prompt 2: <asset0> is token 98 of the prompt", "past the text encoder's 75-token window",
              "move it earlier"), tmp_path)


def test_run_refuses_a_late_handle_before_training(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TrainingRecipe, "run_phase", lambda *a: pytest.fail("training started"))
    args = ["run", *_one_step(files, tmp_path / "out")[1:], "--prompt", f"{LONG} <asset1>", "--steps", "1",
            "--num-images", "1"]
    _refused(capsys, args, ("--prompt 1: <asset1> is token 97",), tmp_path)


def test_long_prompt_with_an_early_handle_warns_and_its_caption_is_clipped(artifacts, tmp_path, capsys):
    words = " ".join(["dog cat bird person"] * 500)  # 2000 words
    out = tmp_path / "out"
    assert main(_sample_args(artifacts["tiny"], out, "--prompt", f"a photo of <asset0> {words}")) == 0
    err = capsys.readouterr().err
    assert "warning: --prompt 1 is 2004 tokens long; the text encoder reads the first 75" in err
    assert (out / "grid.png").is_file()


def test_caption_clipping_measures_logarithmically_often(monkeypatch):
    from PIL import ImageDraw

    from lowmcgm.sampling import previews

    measured, drawn = [], []
    real = ImageDraw.ImageDraw.textlength
    real_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength",
                        lambda self, text, *a, **k: measured.append(len(text)) or real(self, text, *a, **k))
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k:
                        drawn.append((text, k["font"])) or real_text(self, xy, text, *a, **k))
    text = "a photo of <asset0> " + "dog " * 20000
    sheet = previews.render_contact_sheet([previews.SheetRow(title=text)])
    width = sheet.width - 2 * previews.PAD_PX  # the room a title has
    [(clipped, font)] = drawn
    draw = ImageDraw.Draw(sheet)
    assert clipped.endswith("...") and text.startswith(clipped[:-3])
    assert real(draw, clipped, font=font) <= width < real(draw, text[:len(clipped) - 2] + "...", font=font)
    # One full measure, then bisection over at most `width` characters (a glyph is >= 1 px wide).
    assert len(measured) <= 12 and max(measured[1:]) <= width + 3


# ------------------------------------------------------------------------------------------------
# A mask the centre crop cuts away: refused by training and sampling alike (issue 13, class 11)
# ------------------------------------------------------------------------------------------------

def test_mask_cut_away_by_the_centre_crop_is_refused_by_train_and_sample(files, artifacts, tmp_path, capsys):
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (3 * SIZE, SIZE), (40, 160, 60)).save(wide / "photo.png")
    edge = np.zeros((SIZE, 3 * SIZE), np.uint8)
    edge[20:80, 2:30] = 255  # a subject at the left edge, outside the central square
    Image.fromarray(edge).save(wide / "edge.png")
    inside = np.zeros((SIZE, 3 * SIZE), np.uint8)
    inside[20:80, 130:170] = 255
    Image.fromarray(inside).save(wide / "inside.png")
    fragment = "keeps only 0% of its pixels in the central"
    _refused(capsys, _train_args(files, tmp_path / "out", image=str(wide / "photo.png"),
                                 masks=(str(wide / "inside.png"), str(wide / "edge.png"))),
             (f"Mask {wide / 'edge.png'} {fragment}",), tmp_path)
    _refused(capsys, _sample_args(artifacts["tiny"], tmp_path / "out", "--prompt", "a photo of <asset0>",
                                  "--pose", f"asset0={wide / 'edge.png'}"),
             (f"Pose {wide / 'edge.png'} for <asset0> {fragment} 64x64 crop",), tmp_path)
    _refused(capsys, ["run", *_one_step(files, tmp_path / "out")[1:], "--prompt", "a photo of <asset0>",
                      "--pose", f"asset0={wide / 'edge.png'}", "--steps", "1", "--num-images", "1"],
             (f"Pose {wide / 'edge.png'} for <asset0> {fragment}",), tmp_path)
    assert main(_sample_args(artifacts["tiny"], tmp_path / "ok", "--prompt", "a photo of <asset0>",
                             "--pose", f"asset0={wide / 'inside.png'}")) == 0


# ------------------------------------------------------------------------------------------------
# Issue 23: the README's promise for every output, stream and value (classes A, B, C, G, H, I)
# ------------------------------------------------------------------------------------------------

def _lines_of(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


EVENTS_CASES = {  # --events FILE is an output like any other (class A)
    "the photo": ("{photo}", ("is also an input of this command",)),
    "another run's artifact": ("{artifact}", ("is not a lowmcgm events log",)),
    "a kernel file": ("/proc/version", ("is not a lowmcgm events log",)),
    "a device that is always full": ("/dev/full", ("is not a regular file",)),
    "under a regular file": ("{regular-file}/events.jsonl", ("exists and is not a folder", "--events")),
    "the run's own artifact": ("{out}/lowmcgm.safetensors", ("is also an output of this command",)),
    "the run's own artifact, through ..": ("{out}/../out/lowmcgm.safetensors", ("is also an output of this command",)),
    "a link to the run's own artifact": ("{link}", ("is also an output of this command",)),
    "in the run's previews": ("{out}/previews/events.jsonl", ("is also an output of this command",)),
}


@pytest.mark.parametrize("case", EVENTS_CASES.values(), ids=EVENTS_CASES.keys())
def test_events_file_is_guarded_like_every_output(files, artifacts, tmp_path, capsys, case, no_weights_load):
    target, fragments = case
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "out" / "lowmcgm.safetensors")  # dangling: the run has not written it yet
    target = _fill(target, {**files, "artifact": artifacts["tiny"], "out": tmp_path / "out", "link": link})
    protected = {p: _sha(p) for p in (files["photo"], artifacts["tiny"])}
    _refused(capsys, _train_args(files, tmp_path / "out", extra=("--events", target)), fragments, tmp_path)
    assert {p: _sha(p) for p in protected} == protected
    assert not no_weights_load


def test_events_file_beside_the_previews_is_taken(tmp_path):
    """``out/previews/../events.jsonl`` is ``out/events.jsonl``: no output, in no folder the run writes into."""
    from lowmcgm.console.progress import check_event_log

    out = tmp_path / "out"
    (out / "previews").mkdir(parents=True)
    check_event_log(out / "previews" / ".." / "events.jsonl", [], [out / "lowmcgm.safetensors"], [out / "previews"])


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs")
def test_events_file_on_a_read_only_file_system(files, tmp_path, capsys, no_weights_load):
    _refused(capsys, _train_args(files, tmp_path / "out", extra=("--events", "/sys/kernel/events.jsonl")),
             ("/sys/kernel is not writable", "--events"), tmp_path)


def test_a_refused_run_leaves_no_events_file_or_folder(files, tmp_path, capsys):
    events = tmp_path / "logs" / "today" / "events.jsonl"
    _refused(capsys, _train_args(files, tmp_path / "out", masks=("a", "empty.png"), extra=("--events", str(events))),
             ("is empty",), tmp_path)
    # refused once the weights loaded, after the trainer's first event (the overlap warning)
    before = _tree(tmp_path)
    code = main(_train_args(files, tmp_path / "out", masks=("a_overlap.png", "b"),
                            extra=("--events", str(events), "--set", "model.resolution=24")))
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and err.splitlines()[-1].startswith("error: ") and "multiple of 16" in err, err
    assert _tree(tmp_path) == before


def test_events_are_written_and_appended_to_an_events_log(files, tmp_path, capsys):
    from lowmcgm.console.progress import read_events

    events = tmp_path / "logs" / "events.jsonl"
    assert main(_one_step(files, tmp_path / "one", "--events", str(events))) == 0
    first = read_events(events)
    assert first and first[-1]["kind"] == "saved"
    assert main(_one_step(files, tmp_path / "two", "--events", str(events))) == 0
    assert len(read_events(events)) == 2 * len(first)


def _shell(command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_closed_stdout_is_one_line_before_anything_is_written(files, tmp_path):
    """``lowmcgm train ... >&-`` (class B): the command has nowhere to say what it did."""
    import shlex

    for args in (["presets"], _one_step(files, tmp_path / "out")):
        proc = _shell(f"{shlex.quote(sys.executable)} -m lowmcgm.cli {shlex.join(args)} >&-")
        assert proc.returncode == EXIT_USER_ERROR, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: standard output is closed"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_disk_full_while_writing_the_loss_history(files, tmp_path, capsys, monkeypatch):
    """ENOSPC after the artifact (class B): one line, and no half-written loss_history.json."""
    import builtins
    import errno
    import io

    real_open = builtins.open

    class FillsUp:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return FillsUp(fh) if "loss_history" in str(file) and "w" in mode else fh

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    out = tmp_path / "out"
    code = main(_one_step(files, out))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    last = err.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("error: Cannot write") and "loss_history.json (No space left on device)" in last, err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not [p for p in out.iterdir() if "loss_history" in p.name]
    assert (out / "lowmcgm.safetensors").is_file()


def test_prompts_file_without_end_is_refused(artifacts, tmp_path):
    """``sample --prompts /dev/zero`` under a memory limit (class B): what is read is bounded."""
    import shlex

    args = _sample_args(artifacts["tiny"], tmp_path / "out", "--prompts", "/dev/zero")
    proc = _shell(f"ulimit -v 2500000; {shlex.quote(sys.executable)} -m lowmcgm.cli {shlex.join(args)}")
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/zero" in lines[0] and "MiB" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_ui_root_that_is_a_file(files, tmp_path, capsys):
    _refused(capsys, ["ui", "--root", str(files["regular-file"])], ("exists and is not a folder", "--root"),
             tmp_path)


ESTIMATE_CARDS = {"nan": "nan", "infinite": "inf", "past any card": "1e308", "negative": "-1", "zero": "0"}


@pytest.mark.parametrize("card", ESTIMATE_CARDS.values(), ids=ESTIMATE_CARDS.keys())
def test_estimate_card_is_range_checked(tmp_path, capsys, card):
    _refused(capsys, ["estimate", "--preset", "tiny-cpu", "--base-model", "tiny", "--card", card],
             ("--card must be", "GB"), tmp_path)


def test_import_lora_with_an_alpha_training_refuses(tmp_path, capsys):
    lora = tmp_path / "negative.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(-4.0)}, str(lora))
    code = main(["import-lora", str(lora)])
    out, err = _lines_of(capsys)
    assert code == EXIT_USER_ERROR, out + err
    assert "--set lora.alpha=-4" not in out
    assert err.startswith("error: ") and err.count("\n") == 1 and "lora.alpha must be > 0 (got -4.0)" in err, err


def test_demo_never_writes_into_a_folder_holding_another_run(tmp_path, capsys):
    """``demo --out`` on another run (class G): refused before its inputs are written over."""
    out = tmp_path / "demo"
    (out / "inputs").mkdir(parents=True)
    (out / "lowmcgm.safetensors").write_bytes(b"another run's artifact")
    (out / "inputs" / "photo.png").write_bytes(b"the user's photo")
    (out / "inputs" / "prompts.txt").write_text("the user's prompts\n")
    _refused(capsys, ["demo", "--base-model", "tiny", "--out", str(out)], ("holds another run", "--overwrite"),
             tmp_path)
    assert (out / "inputs" / "photo.png").read_bytes() == b"the user's photo"
    assert (out / "inputs" / "prompts.txt").read_text() == "the user's prompts\n"


def test_samples_of_prompt_100_and_later_are_earlier_samples(artifacts, tmp_path, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    late = [out / "p100-000-seed0.png", out / "p07-1000-seed1000.png"]
    for path in late:
        shutil.copy(artifacts["tiny"].parent / "loss_history.json", path)
    _refused(capsys, _sample_args(artifacts["tiny"], out, "--prompt", "a photo of <asset0>"),
             ("holds earlier samples", "--overwrite"), tmp_path)
    assert main(_sample_args(artifacts["tiny"], out, "--prompt", "a photo of <asset0>", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p00-000-seed0.png", "samples.json"]


def test_overwrite_removes_only_what_lowmcgm_wrote(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_one_step(files, out)) == 0
    mine = [out / "samples" / "my-notes.txt", out / "previews" / "favourite.png", out / "notes.md"]
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's own")
    (out / "samples" / "p00-000-seed0.png").write_bytes(b"an earlier sample")
    (out / "previews" / "step00000.png").write_bytes(b"an earlier preview")
    assert main(_one_step(files, out, "--overwrite")) == 0
    assert all(p.read_text() == "the user's own" for p in mine)
    assert not (out / "samples" / "p00-000-seed0.png").exists() and not (out / "previews" / "step00000.png").exists()
    # the user's own files alone are no earlier run
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in ("lowmcgm.safetensors", "config.toml", "loss_history.json"):
        (out / name).unlink()
    assert main(_one_step(files, out)) == 0, capsys.readouterr().err


ESCAPES = "\x1b]0;owned\x07\x1b[2J"


def test_metadata_reaches_the_terminal_escaped(artifacts, tmp_path, capsys):
    """A base_model holding escape sequences (class H): shown as text, never run by the terminal."""
    import json

    from safetensors import safe_open

    with safe_open(str(artifacts["tiny"]), "pt") as fh:
        recorded = json.loads(fh.metadata()["training_config"])
    recorded["model"]["base_model"] = ESCAPES  # sampling reads the base model as --base-model named it
    forged = _forged(artifacts["tiny"], tmp_path, base_model=ESCAPES, training_config=json.dumps(recorded))
    assert main(["inspect", str(forged)]) == 0
    out, err = _lines_of(capsys)
    assert "\x1b" not in out + err and "\x07" not in out + err and "\\x1b]0;owned\\x07" in out
    line = _refused(capsys, _sample_args(forged, tmp_path / "out", "--prompt", "a photo of <asset0>"), (), tmp_path)
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line


PARSER_CASES = {
    "unknown scheduler": (["--scheduler", "bogus"], ("argument --scheduler: invalid choice: 'bogus'",)),
    "fractional width": (["--width", "64.5"], ("argument --width: invalid int value: '64.5'",)),
    "missing artifact": ([], ("the following arguments are required",)),
}


@pytest.mark.parametrize("case", PARSER_CASES.values(), ids=PARSER_CASES.keys())
def test_parser_refusals_are_one_error_line(tmp_path, capsys, case):
    """Class I: argparse's refusals keep to the promise too (no 15 lines of usage)."""
    flags, fragments = case
    args = ["sample", "--out", str(tmp_path / "out"), "--prompt", "x", *flags]
    if flags:
        args += ["--artifact", str(tmp_path / "a.safetensors")]
    line = _refused(capsys, args, fragments, tmp_path)
    assert "lowmcgm sample --help" in line


def test_resume_with_the_runs_own_config(files, tmp_path, capsys):
    """The troubleshooting table's advice (class I): --config <out>/config.toml --resume works."""
    out = tmp_path / "run"
    assert main(_one_step(files, out, "--set", "train.checkpoint_every=1", "--set", "train.phase2_steps=2")) == 0
    config = out / "config.toml"
    config.write_text(config.read_text() + "# my note\n")
    assert main(["train", "--config", str(config), "--resume"]) == 0, capsys.readouterr().err
    assert config.read_text().endswith("# my note\n")  # the same settings: the file it read stays as it was
    code = main(["train", "--config", str(config), "--resume", "--set", "train.phase2_steps=3"])
    assert code == 0, capsys.readouterr().err
    assert "phase2_steps = 3" in config.read_text()  # a changed setting is recorded
