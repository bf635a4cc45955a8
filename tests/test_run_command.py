"""A run described once (``runs.command.RunCommand``): its Config is the one its command line resolves."""

from __future__ import annotations

import pytest

from lowmcgm.config import parse_set, resolve_config
from lowmcgm.console.arguments import build_parser, flag_values
from lowmcgm.errors import UserError
from lowmcgm.runs.command import RunCommand

INPUTS = (("model.base_model", "tiny"), ("data.image", "photo.png"), ("data.masks", "a.png"),
          ("data.handles", "<a>"), ("data.masks", "b.png"), ("data.handles", "<b>"))


def parsed_config(argv: list[str]):
    """What ``lowmcgm run`` resolves from ``argv``, through its own parser."""
    args = build_parser().parse_args(argv)
    return resolve_config(args.preset, args.config, parse_set(args.set), flag_values(args))


@pytest.mark.parametrize("joined", [False, True], ids=["spaced", "joined"])
def test_the_command_line_resolves_the_runs_own_config(joined):
    # Spaced, a value that looks like a flag would be read as one; joined, any value is safe.
    words = ("--out=x", "-h") if joined else ("dog", "cat")
    run = RunCommand("tiny-cpu", INPUTS + tuple(("data.init_words", word) for word in words),
                     (("output.out", "runs/a"), ("sample.steps", 3)), overrides=(("train.phase1_steps", 7),),
                     extra=("--events=runs/a/events.jsonl",), joined=joined)
    argv = run.command()
    if joined:  # no value stands alone, to be read as a flag of its own
        assert all(a.startswith("--") and "=" in a for a in argv[1:])
    cfg = run.config()
    assert cfg == parsed_config(argv)
    assert cfg.data.masks == ("a.png", "b.png") and cfg.data.init_words == words
    assert (cfg.train.phase1_steps, cfg.sample.steps, cfg.output.out) == (7, 3, "runs/a")
    assert build_parser().parse_args(argv).events == "runs/a/events.jsonl"


def test_a_flag_beats_a_set_item_and_refusals_name_the_flag_or_the_key():
    run = RunCommand("tiny-cpu", INPUTS, (("output.preview_every", 5),), overrides=(("output.preview_every", 9),))
    assert run.config().output.preview_every == parsed_config(run.command()).output.preview_every == 5
    bad = RunCommand("tiny-cpu", INPUTS, (("output.preview_every", -1),))
    with pytest.raises(UserError, match="--preview-every must be >= 0"):
        bad.config()
    with pytest.raises(UserError, match="output.preview_every must be >= 0"):
        RunCommand("tiny-cpu", INPUTS, (("output.preview_every", -1),), named_by_key=True).config()
