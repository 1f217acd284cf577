"""The `petal` command. Each command parses options, calls one library function and formats its
result; no logic lives here.

command.py (help that reads plainly) -> options.py (options several commands share), render.py
(what is printed) -> one module per group of commands -> app.py (the `petal` group and `main`)."""

from petal.cli.app import app, main

__all__ = ["app", "main"]
