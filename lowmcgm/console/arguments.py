"""The ``lowmcgm`` command line's parser: its subcommands and flags, each config field's flag as the
field declares it (name, type, choices, help, default), and argparse's refusals as one ``error:`` line.
``cli.py`` runs the commands.
"""

from __future__ import annotations

import argparse
from typing import Any

from lowmcgm import __version__
from lowmcgm.errors import UserError
from lowmcgm.models.dtypes import DTYPE_NAMES


class Parser(argparse.ArgumentParser):
    """argparse, keeping the promise of every refusal: one ``error:`` line, exit 2 (not the usage).

    Its subcommands' parsers are of this class too (``add_subparsers`` makes them of the parent's).
    """

    def error(self, message: str) -> Any:
        raise UserError(f"{message}; '{self.prog} --help' lists the options.")


def add_config_args(p: argparse.ArgumentParser, example: str = "train.lora_lr=1e-4") -> None:
    p.add_argument("--preset", help="a shipped preset (see 'lowmcgm presets') or a TOML file; its values replace "
                                    "the defaults the flags show")
    p.add_argument("--config", help="a TOML file of overrides, applied after the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any config field, e.g. --set {example} (repeatable; a flag typed out beats "
                        "it; 'lowmcgm config-keys' lists them)")


def default_text(value: Any) -> str:
    """' (default 30)'; nothing for a switch, or for '' and () whose meaning the field's help gives."""
    if isinstance(value, bool) or value in ("", ()):
        return ""
    return f" (default {value:g})" if isinstance(value, float) else f" (default {value})"


def add_field_flags(p: argparse.ArgumentParser, *keys: str, help: str | None = None) -> None:
    """Add the flags of config fields as the fields declare them: name, type, choices, help, default.

    A flag left out reads None, so it leaves the value of the preset, --config and --set alone
    (``flag_values``); ``help`` replaces the field's help where a command says it its own way.
    """
    from lowmcgm.config import config_field

    dests = dict(p.get_default("config_flags") or {})
    for key in keys:
        f, typ = config_field(key)
        text = (help or f.metadata["help"]) + default_text(f.default)
        if typ is bool:  # a switch turns its field away from the default: --vae-slicing on, --no-mask off
            action = p.add_argument(f.metadata["flag"], action="store_const", const=not f.default, help=text)
        elif isinstance(f.default, tuple):
            action = p.add_argument(f.metadata["flag"], action="append", help=text + " (repeat)")
        else:  # '' among the choices is the flag left out, not a value to type
            choices = [c for c in f.metadata["choices"] if c] or None
            action = p.add_argument(f.metadata["flag"], type=typ, choices=choices, help=text)
        dests[key] = action.dest
    p.set_defaults(config_flags=dests)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """Config key -> value of each field flag the command line typed out."""
    dests = getattr(args, "config_flags", {})
    return {key: getattr(args, dest) for key, dest in dests.items() if getattr(args, dest) is not None}


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    add_field_flags(p, "data.image", "data.masks", "data.init_words", "data.handles", "model.base_model",
                     "output.out")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds (its artifact, "
                                                            "config, checkpoint, previews and samples)")
    p.add_argument("--events", metavar="FILE", help="also append progress events to FILE as JSON lines (for "
                                                    "scripts; the web page reads them): a new file, or an "
                                                    "earlier events log")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    from lowmcgm.config import all_keys

    p.add_argument("--prompt", action="append", default=[], help="a prompt naming handles, e.g. "
                   "'a photo of <asset0> on the beach' (repeat for several)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt a line, optionally with its own poses: "
                   "'a photo of <asset0> | asset0=run.png' (pose files relative to FILE)")
    p.add_argument("--pose", action="append", default=[], metavar="HANDLE=FILE",
                   help="pose mask for a handle (asset0=run.png; all=FILE for every handle of a prompt); "
                        "a handle without a pose gets the blank mask (repeat)")
    add_field_flags(p, *(key for key in all_keys() if key.startswith("sample.")))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowmcgm", description=(
        "Teach Stable Diffusion several subjects from one photo and their masks (MCGM), "
        "then generate them in poses you draw as masks."))
    parser.add_argument("--version", action="version", version=f"lowmcgm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train handles, mask encoder and LoRA; write one artifact")
    add_train_args(p)
    p = sub.add_parser("presets", help="list the shipped presets")
    p = sub.add_parser("config-keys", help="list every config key with its default and help")
    p = sub.add_parser("inspect", help="print an artifact's contents and metadata")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("sample", help="generate the learned subjects in new scenes, posed by masks")
    p.add_argument("--artifact", required=True, help="the .safetensors file 'train' wrote")
    p.add_argument("--base-model", help="default: the base model recorded in the artifact")
    p.add_argument("--out", required=True, help="output folder for the PNGs, grid.png and samples.json")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier samples --out holds")
    add_config_args(p, example="sample.steps=20")
    add_sample_args(p)
    p = sub.add_parser("run", help="train, then sample, in one process (previews during training)")
    add_train_args(p)
    add_sample_args(p)
    add_field_flags(p, "output.preview_every")
    p = sub.add_parser("demo", help="learn a dog and a cat from a bundled toy photo, draw them in new poses "
                                    "(lowmcgm run on the toy model: a few minutes on a CPU)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); inputs/ holds the "
                                                      "photo, masks, pose masks and prompts it made")
    p.add_argument("--base-model", default="toy", help="the model to learn on (default toy, the bundled toy-world "
                                                       "model)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    add_field_flags(p, "sample.pose_guidance", help="pose guidance while sampling, as for run and sample")
    p = sub.add_parser("ui", help="start the local web page: paint masks, train, draw poses and sample (needs "
                                  "the optional extra: pip install -e '.[ui]')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; reach a remote GPU box through an SSH tunnel)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--root", default="runs/ui", help="folder of the page's runs, the only server-side folder it "
                                                     "reads or writes (default runs/ui)")
    p.add_argument("--base-model", action="append", metavar="MODEL",
                   help="a base model the page offers, the only model paths it reads (repeat for several; the "
                        "first is preselected; default toy)")
    p.add_argument("--preset", default="toy-cpu", help="the page's default preset (default toy-cpu)")
    p = sub.add_parser("export", help="write the LoRA and handles for A1111, ComfyUI, kohya or diffusers")
    p.add_argument("artifact", help="the .safetensors file 'train' wrote")
    p.add_argument("--format", required=True, metavar="kohya|embeddings|diffusers",
                   help="kohya: one LoRA file for A1111/ComfyUI/kohya; embeddings: one textual-inversion "
                        "file per handle; diffusers: a folder for load_lora_weights/load_textual_inversion")
    p.add_argument("--out", required=True, help="kohya: a .safetensors file; embeddings, diffusers: a folder")
    p.add_argument("--no-bundle-embeddings", action="store_true",
                   help="kohya: leave the handles out of the LoRA file (diffusers' load_lora_weights "
                        "refuses files that bundle them)")
    p.add_argument("--dtype", default="fp16", metavar="|".join(DTYPE_NAMES), help="precision of the LoRA weights")
    p.add_argument("--force", action="store_true", help="replace files that exist (never the artifact itself)")
    p = sub.add_parser("import-lora", help="check a kohya or diffusers LoRA and print the settings that "
                                           "start phase 2 from it")
    p.add_argument("file", help="a kohya or diffusers LoRA .safetensors file, a diffusers LoRA folder, or a "
                                "lowmcgm artifact")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("estimate", help="predict the peak GPU memory of training, per phase and itemised "
                                        "(no GPU, no weights: traced on fake tensors)")
    add_config_args(p)
    p.add_argument("--base-model", default="sd15", help="sd15 (default), sd21-base, sd21-768, sdxl-base, tiny, "
                                                        "tiny-xl, or a local diffusers folder (only its config files "
                                                        "are read)")
    add_field_flags(p, "model.resolution")
    p.add_argument("--card", type=float, metavar="GB", help="the card to fit (default: the one the preset is "
                                                            "named for, e.g. 8 for 8gb); settings that would fit "
                                                            "are searched when it does not")
    p.add_argument("--json", action="store_true", help="print the figures as JSON, in bytes")
    return parser
