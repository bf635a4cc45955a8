"""A run described once: from its preset, flags and ``--set`` items come both the validated
``Config`` the library trains with and the ``lowmcgm run`` command line that trains the same.

``lowmcgm demo`` prints the command of the run it makes; the web page starts its training as that
command in a child process (and keeps it for resume). Both describe the run one way, here, so the
configuration checked up front and the one the command resolves cannot drift apart.

Example::

    run = RunCommand("8gb", (("data.image", "photo.png"), ("data.masks", "a.png"), ("output.out", "runs/a")))
    cfg, argv = run.config(), run.command()   # a Config; ["run", "--preset", "8gb", "--image", "photo.png", ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmcgm.config import Config, config_field, field_flag, resolve_config

Flags = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class RunCommand:
    """One ``lowmcgm run``: the values of its flags, its prompts file, and whether it replaces a run.

    Attributes:
        preset: ``--preset``.
        input_flags: (config key, value) of the flags before ``--prompts``, in command-line order;
            the key of a list field repeats, once per value (``data.masks``). Switches (bool
            fields) are not among them: each flag is written with its value.
        output_flags: the flags after ``--prompts``: sampling and the output folder.
        prompts: the prompts file (each prompt with its poses, relative to the file), or None.
        overwrite: replace an earlier run in the output folder (``--overwrite``).
        overrides: ``--set`` items, (config key, value).
        extra: arguments that set no configuration (``--events=FILE``), written last.
        joined: each value inside its flag (``--init-word=--out=x``), so that nothing a user typed
            can be read as a flag of its own; otherwise ``--flag VALUE``, as people type it.
        named_by_key: ``config()``'s refusals name the setting (``output.preview_every``) rather than
            its flag: the page shows boxes, not flags.
    """

    preset: str
    input_flags: Flags
    output_flags: Flags = ()
    prompts: Path | None = None
    overwrite: bool = False
    overrides: Flags = ()
    extra: tuple[str, ...] = ()
    joined: bool = False
    named_by_key: bool = False

    def flag_values(self) -> dict[str, Any]:
        """Config key -> value, as ``lowmcgm run`` reads these flags (a later flag wins; lists gather)."""
        values: dict[str, Any] = {}
        for key, value in self.input_flags + self.output_flags:
            if isinstance(config_field(key)[0].default, tuple):
                value = values.get(key, ()) + (value,)
            values[key] = value
        return values

    def config(self) -> Config:
        """The run's validated configuration: the preset, then ``overrides``, then the flags.

        Raises:
            UserError: a value the configuration refuses, named as the command line names it.
        """
        if self.named_by_key:  # the flags' values still beat the --set items, as on the command line
            return resolve_config(self.preset, None, {**dict(self.overrides), **self.flag_values()})
        return resolve_config(self.preset, None, dict(self.overrides), self.flag_values())

    def command(self) -> list[str]:
        """The ``lowmcgm run`` command line of this run (without the program name)."""
        def arg(flag: str, value: Any) -> list[str]:
            return [f"{flag}={value}"] if self.joined else [flag, str(value)]

        def flags(items: Flags) -> list[str]:
            return [a for key, value in items for a in arg(field_flag(key), value)]

        prompts = arg("--prompts", self.prompts) if self.prompts is not None else []
        sets = [a for key, value in self.overrides for a in arg("--set", f"{key}={value}")]
        return ["run", *arg("--preset", self.preset), *flags(self.input_flags), *prompts, *flags(self.output_flags),
                *(["--overwrite"] if self.overwrite else []), *sets, *self.extra]
