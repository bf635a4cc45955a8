"""The ``lowmcgm`` command: subcommands, rich progress, one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from lowmcgm.console.arguments import build_parser, flag_values
from lowmcgm.console.oom import out_of_memory_advice
from lowmcgm.console.terminal import escape_controls
from lowmcgm.errors import UserError
from lowmcgm.runs.folder import hold_folder, run_files
from lowmcgm.runs.signals import exit_code, route_stop_signals, signal_name
from lowmcgm.runs.write_guard import check_not_inputs, check_writable_folder, same_file

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143, SIGHUP 129 (signals.exit_code)
EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE, as a shell reports a writer whose reader closed the pipe


def _train_config(args: argparse.Namespace):
    """The run's Config from preset, --config, --set and flags; refuses a run with nothing to train on."""
    from lowmcgm.config import parse_set, resolve_config

    cfg = resolve_config(args.preset, args.config, parse_set(args.set), flag_values(args))
    if not cfg.data.image:
        raise UserError("No photo: pass --image PHOTO.")
    if not cfg.data.masks:
        raise UserError("No masks: pass one --mask per subject.")
    if not cfg.output.out:
        raise UserError("No output folder: pass --out DIR.")
    # The run writes <out>/config.toml: never over the file its settings came from, except the
    # run's own on --resume (the troubleshooting table's way to resume): that one the run reads
    # whole first, and rewrites only to record a changed setting (output.write_effective_config).
    out = Path(cfg.output.out).expanduser()
    own_config = bool(args.resume and args.config) and same_file(args.config, out / "config.toml")
    preset, config = _config_files(args)
    check_not_inputs(run_files(out, cfg.output.artifact_name), [preset, "" if own_config else config])
    return cfg


def _config_files(args: argparse.Namespace) -> tuple[str, str]:
    """The files a command's settings are read from: (--preset when it names a file, --config); '' where none."""
    preset = args.preset if args.preset and Path(args.preset).is_file() else ""
    return preset, args.config or ""


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Any]:
    """The progress callback of a command: the terminal display, plus --events' log if given."""
    from lowmcgm.console.progress import EventLog, ProgressPrinter, tee

    log = EventLog(args.events) if getattr(args, "events", None) else None
    refused = False
    try:
        with ProgressPrinter() as printer:
            yield tee(printer, log)
    except UserError:
        refused = True
        raise
    finally:
        if log is not None:
            log.close(refused=refused)


def _check_events(args: argparse.Namespace, cfg: Any, more_inputs: Iterable[str] = ()) -> None:
    """``--events FILE`` is an output like any other: never an input, never another output, never a
    file it would damage, checked before anything is written (``progress.check_event_log``)."""
    if not getattr(args, "events", None):
        return
    from lowmcgm.console.progress import check_event_log
    from lowmcgm.runs.folder import LOCK_NAME, RUN_FOLDERS
    from lowmcgm.training.trainer import input_files

    out = Path(cfg.output.out).expanduser()
    check_event_log(args.events, [*input_files(cfg), *_config_files(args), *more_inputs],
                    [*run_files(out, cfg.output.artifact_name), out / LOCK_NAME],
                    [out / name for name in RUN_FOLDERS])


def _cmd_train(args: argparse.Namespace) -> int:
    from lowmcgm.training.trainer import train

    cfg = _train_config(args)
    _check_events(args, cfg)
    with hold_folder(cfg.output.out), _progress(args) as printer, out_of_memory_advice(cfg, args.preset):
        path = train(cfg, on_progress=printer, resume=args.resume, overwrite=args.overwrite)
    _print(f"Artifact written: {path}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from lowmcgm.presets import list_presets

    presets = list_presets()
    width = max(map(len, presets))
    for name, line in presets.items():
        _print(f"{name:<{width}}  {line}")
    return 0


def _cmd_config_keys(args: argparse.Namespace) -> int:
    import dataclasses

    from lowmcgm.config import Config, all_keys, field_help

    defaults = dataclasses.asdict(Config())
    for key in all_keys():
        section, name = key.split(".")
        _print(f"{key} = {defaults[section][name]!r}\n    {field_help(key)}")
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
        _print(json.dumps(summary | {"training_config": art.meta.get("training_config")}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text(): names and metadata come from the artifact's author and are shown as data, never as
    # rich markup ("[/x]" in a stranger's file would otherwise crash the table or restyle it).
    # escape_controls(): escape sequences in them are shown, never run by the terminal.
    table = Table(title=Text(escape_controls(f"lowmcgm artifact {args.artifact} ({size / 2**20:.2f} MiB)")),
                  show_header=False)
    for key, value in summary.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        table.add_row(Text(escape_controls(key)), Text(escape_controls(text)))
    Console().print(table)
    return 0


def _sample_inputs(args: argparse.Namespace) -> tuple[list[Any], dict[str, str]]:
    """Prompts and --pose items from the flags (nothing heavy is loaded)."""
    from lowmcgm.sampling.prompts import PromptSpec, load_prompts_file, parse_poses

    specs = [PromptSpec(text, where=f"--prompt {i}") for i, text in enumerate(args.prompt, 1)]
    if args.prompts:
        specs += load_prompts_file(args.prompts)
    return specs, parse_poses(args.pose)


def _sample_settings(args: argparse.Namespace) -> Any:
    """``lowmcgm sample``'s [sample] section from preset, --config, --set and flags.

    A preset or --config may hold every section (a run's config.toml does); a --set of another
    section is refused, as it would change nothing.
    """
    from lowmcgm.config import parse_set, resolve_config

    overrides = parse_set(args.set)
    settings = resolve_config(args.preset, args.config, overrides, flag_values(args)).sample
    stray = [key for key in overrides if not key.startswith("sample.")]
    if stray:
        raise UserError(f"--set {stray[0]} has no effect on lowmcgm sample, which reads only sample.* keys.")
    return settings


def _cmd_sample(args: argparse.Namespace) -> int:
    from lowmcgm.console.progress import ProgressPrinter
    from lowmcgm.sampling.sampler import sample_artifact

    settings = _sample_settings(args)
    specs, poses = _sample_inputs(args)
    with hold_folder(args.out), ProgressPrinter() as printer, out_of_memory_advice():
        grid = sample_artifact(args.artifact, specs, poses, settings, args.out, base_model=args.base_model or "",
                               report=printer, overwrite=args.overwrite)
    _print(f"Samples written to {grid.parent} (contact sheet: {grid.name}, index: samples.json)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    specs, poses = _sample_inputs(args)
    _check_events(args, cfg, [args.prompts or "", *poses.values(), *(f for s in specs for f in s.poses.values())])
    return _train_then_sample(args, cfg, args.preset, specs, poses, resume=args.resume, overwrite=args.overwrite)


def _cmd_demo(args: argparse.Namespace) -> int:
    import shlex

    from lowmcgm.runs.folder import check_run_folder
    from lowmcgm.runs.output import check_output_dir
    from lowmcgm.sampling.prompts import load_prompts_file
    from lowmcgm.toy.demo import DEMO_PRESET, demo_inputs, demo_run, describe_base, write_demo_inputs

    size_px, note = describe_base(args.base_model)  # fails here when the toy model is not bundled
    if note:
        _print(note)
    out = check_output_dir(args.out)
    run = demo_run(demo_inputs(out / "inputs"), out, args.base_model, overwrite=args.overwrite,
                   pose_guidance=args.guidance or "")
    cfg = run.config()
    # Its inputs are written into <out>/inputs: a folder holding another run is refused first.
    check_run_folder(out, cfg.output.artifact_name, resume=False, overwrite=args.overwrite)
    write_demo_inputs(out / "inputs", size_px)
    _print(f"The demo is: lowmcgm {shlex.join(run.command())}")
    return _train_then_sample(args, cfg, DEMO_PRESET, load_prompts_file(run.prompts), {}, resume=False,
                              overwrite=run.overwrite)


def _train_then_sample(args: argparse.Namespace, cfg: Any, preset: str | None, specs: list[Any],
                       poses: dict[str, str], resume: bool, overwrite: bool) -> int:
    """``lowmcgm run``'s work, for run and demo: train, sample, say where the outputs are."""
    from lowmcgm.run import train_then_sample

    def guard(stage: str) -> Any:
        return out_of_memory_advice(cfg, preset) if stage == "train" else out_of_memory_advice()

    with _progress(args) as printer:
        result = train_then_sample(cfg, specs, poses, cfg.sample, resume=resume, overwrite=overwrite,
                                   on_progress=printer, guard=guard)
    _print(f"Artifact: {result.artifact}\nPreviews: {result.previews}\nLoss curve: {result.loss_curve}\n"
          f"Samples: {result.grid.parent} (contact sheet: {result.grid})")
    return 0


def _export_hint(fmt: str, handles: list[str], bundled: bool, sdxl: bool) -> str:
    words = ", ".join(handles)
    if fmt == "kohya":
        where = ("A1111 loads the bundled handles with it; ComfyUI also needs --format embeddings"
                 if bundled else "add the handles with --format embeddings")
        return f"Put the file in models/Lora (A1111) or models/loras (ComfyUI) and prompt with {words} ({where})."
    # SDXL's embeddings hold a row per text encoder; diffusers loads them one encoder at a time.
    per_encoder = ("clip_l with text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, then clip_g with "
                   "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2")
    if fmt == "embeddings":
        from lowmcgm.interop.export import embedding_file_stem

        stems = [embedding_file_stem(h) for h in handles]
        diffusers = (f"load_textual_inversion(rows, token=\"{handles[0]}\", ...) for {per_encoder}" if sdxl
                     else f"load_textual_inversion(file, token=\"{handles[0]}\")")
        return (f"A1111: put the files in embeddings/ and prompt with {', '.join(stems)}; ComfyUI (models/embeddings): "
                f"embedding:{stems[0]}; diffusers: {diffusers}.")
    embeddings = (f"learned_embeds.safetensors' rows, token=[{words}], for {per_encoder}" if sdxl
                  else "the vectors of learned_embeds.safetensors")
    return (f"diffusers: pipe.load_lora_weights(folder), then load_textual_inversion with {embeddings}; "
            f"prompt with {words}.")


def _cmd_ui(args: argparse.Namespace) -> int:
    from lowmcgm.ui import require_gradio

    require_gradio()
    from lowmcgm.ui.app import launch

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number (1-65535).")
    root = check_writable_folder(Path(args.root).expanduser(), flag="--root")
    # Returns once the page is closed, its running job (if any) stopped with a checkpoint and waited for.
    launch(root, host=args.host, port=args.port, base_models=tuple(args.base_model or ["toy"]), preset=args.preset)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lowmcgm.interop.export import MASK_ENCODER_NOTE, export_artifact

    result = export_artifact(Path(args.artifact), args.format, Path(args.out),
                             bundle_embeddings=not args.no_bundle_embeddings, dtype=args.dtype, force=args.force)
    for line in result.warnings:
        _say(f"warning: {line}")
    for path in result.files:
        _print(f"Wrote {path}")
    _print(_export_hint(args.format, result.handles, not args.no_bundle_embeddings, result.sdxl))
    _print(MASK_ENCODER_NOTE)
    return 0


def _cmd_import_lora(args: argparse.Namespace) -> int:
    import shlex

    from lowmcgm.interop.lora_import import summarize_lora

    summary = summarize_lora(Path(args.file))
    if summary.settings:  # what it suggests must be what training takes (lora.alpha > 0, ...)
        from lowmcgm.config import parse_set, resolve_config

        try:
            resolve_config(None, None, parse_set(summary.settings))
        except UserError as exc:
            raise UserError(f"{summary.path} cannot start phase 2: {exc}") from exc
    if args.json:
        _print(json.dumps(summary.to_dict(), indent=2))
    else:
        alpha = ", ".join(f"{a:g}" for a in summary.alphas)
        _print(f"{summary.path}: {summary.format} LoRA\n"
              f"  rank {', '.join(map(str, summary.ranks))}, alpha {alpha}"
              f"{'' if summary.alpha_stored else ' (not stored in the file: alpha = rank by convention)'}\n"
              f"  modules: {summary.unet_modules} UNet ({', '.join(summary.unet_targets)}), "
              f"{summary.text_encoder_modules} text encoder"
              f"{' (' + ', '.join(summary.text_encoder_targets) + ')' if summary.text_encoder_targets else ''}\n"
              f"  base model: {summary.base}")
        if summary.embeddings:
            _print(f"  bundled embeddings: {', '.join(summary.embeddings)} (not used for training)")
    if not summary.settings:
        raise UserError(f"{summary.path} mixes ranks or alphas; lowmcgm trains one rank and one alpha, so it "
                        "cannot start from this file.")
    if not args.json:
        sets = " ".join(f"--set {shlex.quote(item)}" for item in summary.settings)
        _print(f"Start phase 2 from it (with the same base model): lowmcgm train ... {sets}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from lowmcgm.config import parse_set, resolve_config
    from lowmcgm.memory.estimate import check_and_suggest, estimate_to_json, format_estimate

    cfg = resolve_config(args.preset, args.config, parse_set(args.set), flag_values(args))
    est, card, suggestions = check_and_suggest(cfg, args.base_model, args.resolution, args.card, args.preset)
    _print(estimate_to_json(est, suggestions, card) if args.json else format_estimate(est, card, suggestions))
    return 0


COMMANDS = {"train": _cmd_train, "presets": _cmd_presets, "config-keys": _cmd_config_keys, "inspect": _cmd_inspect,
            "sample": _cmd_sample, "run": _cmd_run, "demo": _cmd_demo, "export": _cmd_export,
            "import-lora": _cmd_import_lora, "estimate": _cmd_estimate, "ui": _cmd_ui}


def _quiet_libraries() -> None:
    # Library chatter (bitsandbytes' optional CPU kernels, diffusers' dtype notes, transformers'
    # torchvision notes) buries our own messages; --debug keeps it. transformers and diffusers
    # reset their loggers on import, so use their own verbosity switches.
    import logging

    import diffusers.utils.logging
    import transformers.utils.logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _output_arg(args: argparse.Namespace) -> str:
    """The output path a command was given (--out, or --set output.out=), or ''."""
    out = getattr(args, "out", None) or ""
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "output.out":
            out = value.strip()
    return out


def _error_line(exc: UserError) -> str:
    """The refusal as one ``error:`` line, whatever a message quotes (file names and metadata may hold
    line breaks)."""
    return "error: " + " ".join(str(exc).splitlines())


def main(argv: list[str] | None = None) -> int:
    from lowmcgm.runs.output import first_missing_folder, remove_empty_folders

    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:  # argparse's refusal (Parser.error), before any command runs
        _say(_error_line(exc))
        return EXIT_USER_ERROR
    if sys.stdout is None:  # started with stdout closed (>&-): what the command did could not be said
        _say("error: standard output is closed; redirect it to a file or /dev/null instead (>/dev/null).")
        return EXIT_USER_ERROR
    if not args.debug:
        _quiet_libraries()
    # A run that fails leaves no trace: folders it created for its output are removed again while
    # they hold no file (a checkpoint or a finished sample keeps them).
    created = [first_missing_folder(_output_arg(args))]
    if getattr(args, "events", None):
        created.append(first_missing_folder(Path(args.events).expanduser().parent))
    try:
        try:
            # SIGTERM and SIGHUP stop a command as Ctrl-C does (checkpoint, message, exit code 128 + signal).
            with route_stop_signals():
                code = COMMANDS[args.command](args)
                sys.stdout.flush()  # a closed pipe (lowmcgm config-keys | head) shows here, not at exit
                return code
        except BaseException:
            for top in created:
                remove_empty_folders(top)
            raise
    except UserError as exc:
        if args.debug:
            raise
        _say(_error_line(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        _say(f"Interrupted ({signal_name(getattr(exc, 'signum', signal.SIGINT))}); "
             + INTERRUPTED_HINTS.get(args.command, "nothing is left half-written."))
        return exit_code(exc)
    except BrokenPipeError:
        # The reader went away (head, a closed pager): say nothing more, exit as a shell would report it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


# What an interrupted command has left, and how to go on: only train and run can --resume.
INTERRUPTED_HINTS = {
    "train": "continue with --resume (the same command) from the last checkpoint, if training had written one.",
    "run": "continue with --resume (the same command) from the last checkpoint, if training had written one.",
    "demo": "continue with 'lowmcgm demo --overwrite' to start over.",
    "sample": "sampling cannot resume: the images written so far stay in --out; run the same command with "
              "--overwrite to draw them all again.",
}


def _print(text: str) -> None:
    """Print a command's report on stdout, untrusted strings in it escaped (``terminal.escape_controls``)."""
    print(escape_controls(text))


def _say(line: str) -> None:
    """One line on stderr, escaped as ``_print`` escapes; a terminal that is gone (SIGHUP, a closed
    ssh session) is not an error."""
    try:
        print(escape_controls(line), file=sys.stderr, flush=True)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
