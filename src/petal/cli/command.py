"""petal's command and group classes: plain value names in help, and an unknown option
named with the command that has it; the `petal` group's own options."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

try:
    from typer._click.exceptions import BadParameter, NoSuchOption  # typer >= 0.29 carries its own click
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import BadParameter, NoSuchOption


# What help shows for a value, by typer's type label: plain words, not Python types.
METAVARS = {"<str>": "TEXT", "<int>": "INT", "<int range>": "INT", "<float>": "NUMBER",
            "<float range>": "NUMBER", "<path>": "PATH", "<list[str]>": "TEXT"}


def plain_metavars(command: click.Command) -> None:
    """Help that names values as a user would (DATA, PATH, INT), and none for a flag."""
    for p in command.params:
        if p.metavar is not None:
            continue
        if isinstance(p, TyperArgument):
            p.metavar = p.name.upper()
            p.display_type_rich = lambda ctx: None  # its name already says what it is
        elif p.is_flag:
            p.metavar = ""  # --overwrite takes no value: no type to show
        else:
            shown = p.display_type(click.Context(command))
            p.metavar = METAVARS.get(shown.split(" [")[0], shown.strip("<>"))


def escape_help(command: click.Command) -> None:
    """Help texts as written: typer reads them as rich markup, which ate `[bf16]` in
    "pip install 'petal[bf16]'". petal's help uses no markup, so every bracket is escaped."""
    for p in command.params:
        if getattr(p, "help", None):
            p.help = escape(p.help)
    for attr in ("help", "short_help"):
        if getattr(command, attr, None):
            setattr(command, attr, escape(getattr(command, attr)))


class PlainHelp:
    """Mixed into petal's command and group classes: plain value names, --help without a type,
    brackets in help shown as written."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain_metavars(self)
        escape_help(self)

    def get_help_option(self, ctx: click.Context):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class PetalGroup(PlainHelp, TyperGroup):
    """The `petal` group: `petal --help` shows no Python types either."""


class Command(PlainHelp, TyperCommand):
    """A petal command. Given an option it lacks that another command has, it says so
    by name, instead of only "No such option" (e.g. `petal train --unfreeze 3`)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        """`[OPTIONS] DATA [INPUTS]...`: optional arguments in brackets, required ones bare."""
        pieces = [self.options_metavar]
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = p.metavar if p.required else f"[{p.metavar}]"
                pieces.append(name + ("..." if p.nargs != 1 else ""))
        return pieces

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            rest = super().parse_args(ctx, args)
        except BadParameter as e:  # typer words a bad choice as pydantic does
            e.message = e.message.removeprefix("Value error, ")
            raise
        except NoSuchOption as e:
            group = ctx.parent.command if ctx.parent else None
            homes = [name for name, cmd in sorted(getattr(group, "commands", {}).items())
                     if name != self.name and any(e.option_name in p.opts for p in cmd.params)]
            if homes:
                e.message = (f"{e.option_name} is an option of `petal {homes[0]}`, "
                             f"not of `petal {self.name}`")
                e.possibilities = None
            raise
        if ctx.ignore_unknown_options:  # a command with --runner beam, whose options petal does not know
            self.take_stray_options(ctx)
        return rest

    def take_stray_options(self, ctx: click.Context) -> None:
        """Unknown --options that an argument swallowed as values (`petal predict M --ouput p.csv a.jpg`
        read --ouput and p.csv as images) go to ctx.args: Beam's, with --runner beam; else an error
        naming the closest option."""
        beam = ctx.params.get("runner") == "beam"
        for p in self.params:
            value = ctx.params.get(p.name)
            if not isinstance(p, TyperArgument) or not value:
                continue
            if isinstance(value, str):
                if value.startswith("--") and not beam:
                    self.refuse_option(ctx, value)
                continue
            kept, stray = split_options(list(value), beam)
            ctx.params[p.name] = kept
            ctx.args = [*stray, *ctx.args]
        if not beam and (options := [a for a in ctx.args if a.startswith("--")]):
            self.refuse_option(ctx, options[0])

    def refuse_option(self, ctx: click.Context, given: str) -> None:
        names = [o for p in self.params if not isinstance(p, TyperArgument) for o in (*p.opts, *p.secondary_opts)]
        close = difflib.get_close_matches(given.split("=")[0], names, n=3, cutoff=0.6)
        raise NoSuchOption(given.split("=")[0], possibilities=close, ctx=ctx)


def split_options(values: list[str], beam: bool) -> tuple[list[str], list[str]]:
    """An argument's values -> (values, --options among them). With `beam`, `--name value` takes its
    value too, unless the value is an existing file (an input): Beam's options may come as either."""
    kept, stray = [], []
    i = 0
    while i < len(values):
        v = values[i]
        if not v.startswith("--"):
            kept.append(v)
        else:
            stray.append(v)
            nxt = values[i + 1] if i + 1 < len(values) else None
            if beam and "=" not in v and nxt is not None and not nxt.startswith("-") and not Path(nxt).exists():
                stray.append(nxt)
                i += 1
        i += 1
    return kept, stray


def show_version(value: bool) -> None:
    if value:
        from petal import __version__

        print(f"petal {__version__}")
        raise typer.Exit()


def options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=show_version,
                                          help="Show petal's version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=(
        "Show a traceback instead of a one-line error (also PETAL_DEBUG=1)."))] = False,
    allow_private_urls: Annotated[Optional[str], typer.Option(help=(
        "Let http(s) URIs name private, loopback or link-local hosts: 'all', or networks such as "
        "10.0.0.0/8 (also PETAL_ALLOW_PRIVATE_URLS; docs/robustness.md)."))] = None,
    max_file_mb: Annotated[Optional[float], typer.Option(min=0.001, help=(
        "Refuse image files larger than this many MiB, unread (default 256; also PETAL_MAX_FILE_MB)."))] = None,
) -> None:
    """Train your own image classifier by transfer learning, offline, fast on a CPU."""
    if allow_private_urls is not None:  # read where each http(s) read connects (petal.http_reader)
        from petal.http_reader import ALLOW_ENV

        os.environ[ALLOW_ENV] = allow_private_urls
    if max_file_mb is not None:  # read by every file read (petal.storage.read_bytes), threads included
        from petal.storage import MAX_FILE_ENV

        os.environ[MAX_FILE_ENV] = str(max_file_mb)
