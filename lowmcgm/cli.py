"""The ``lowmcgm`` command: subcommands, rich progress, one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowmcgm import __version__
from lowmcgm.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a shipped preset (see 'lowmcgm presets') or a TOML file")
    p.add_argument("--config", help="a TOML file of overrides, applied after the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.lora_lr=1e-4 (repeatable; "
                        "'lowmcgm config-keys' lists them)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--image", help="the photo (PNG or JPEG)")
    p.add_argument("--mask", action="append", default=[], help="one mask per subject, in handle order (repeat)")
    p.add_argument("--init-word", action="append", default=[], help="initializer word per subject (repeat)")
    p.add_argument("--handle", action="append", default=[], help="handle name per subject, e.g. '<mydog>' (repeat)")
    p.add_argument("--base-model", help="diffusers folder, cached hub id, .safetensors file, or 'tiny'")
    p.add_argument("--out", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.safetensors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowmcgm", description=(
        "Teach Stable Diffusion several subjects from one photo and their masks (MCGM), "
        "then generate them in poses you draw as masks."))
    parser.add_argument("--version", action="version", version=f"lowmcgm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train handles, mask encoder and LoRA; write one artifact")
    _add_train_args(p)
    p = sub.add_parser("presets", help="list the shipped presets")
    p = sub.add_parser("config-keys", help="list every config key with its default and help")
    p = sub.add_parser("inspect", help="print an artifact's contents and metadata")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from lowmcgm.config import parse_set

    overrides: dict[str, Any] = {}
    direct = {"image": "data.image", "base_model": "model.base_model", "out": "output.out"}
    for attr, key in direct.items():
        if getattr(args, attr, None):
            overrides[key] = getattr(args, attr)
    repeated = {"mask": "data.masks", "init_word": "data.init_words", "handle": "data.handles"}
    for attr, key in repeated.items():
        if getattr(args, attr, None):
            overrides[key] = list(getattr(args, attr))
    overrides.update(parse_set(args.set))
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from lowmcgm.config import resolve_config
    from lowmcgm.progress import ProgressPrinter
    from lowmcgm.trainer import train

    cfg = resolve_config(args.preset, args.config, _train_overrides(args))
    if not cfg.data.image:
        raise UserError("No photo: pass --image PHOTO.")
    if not cfg.data.masks:
        raise UserError("No masks: pass one --mask per subject.")
    with ProgressPrinter() as printer:
        path = train(cfg, on_progress=printer, resume=args.resume)
    print(f"Artifact written: {path}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from lowmcgm.presets import list_presets

    presets = list_presets()
    width = max(map(len, presets))
    for name, line in presets.items():
        print(f"{name:<{width}}  {line}")
    return 0


def _cmd_config_keys(args: argparse.Namespace) -> int:
    import dataclasses

    from lowmcgm.config import Config, all_keys, field_help

    defaults = dataclasses.asdict(Config())
    for key in all_keys():
        section, name = key.split(".")
        print(f"{key} = {defaults[section][name]!r}\n    {field_help(key)}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lowmcgm.artifact import load_artifact

    art = load_artifact(Path(args.artifact))
    size = Path(args.artifact).stat().st_size
    summary = {
        "file": args.artifact, "size_bytes": size, "handles": art.handles, "text_width": art.text_width,
        "mask_tokens": art.uses_mask_tokens, "unet_lora_tensors": len(art.unet_lora),
        "text_encoder_lora_tensors": len(art.text_encoder_lora),
        **{k: v for k, v in art.meta.items() if k != "training_config"},
    }
    if args.json:
        print(json.dumps(summary | {"training_config": art.meta.get("training_config")}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lowmcgm artifact {args.artifact} ({size / 2**20:.2f} MiB)", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    Console().print(table)
    return 0


COMMANDS = {"train": _cmd_train, "presets": _cmd_presets, "config-keys": _cmd_config_keys, "inspect": _cmd_inspect}


def _quiet_libraries() -> None:
    # Library chatter (bitsandbytes' optional CPU kernels, diffusers' dtype notes) buries our own
    # messages; --debug keeps it.
    import logging

    for name in ("bitsandbytes", "diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("Interrupted. A checkpoint was saved if training had started; continue with --resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
