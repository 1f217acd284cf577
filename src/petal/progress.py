"""How long work reports progress: one interface for every step.

Library functions take a `Reporter` and call it; the default reports nothing. The
CLI passes one that draws rich progress bars (`petal.cli.render.RichReporter`); a script
can subclass it to log.

    with reporter.progress("embedding", total=len(uris)) as advance:
        ...
        advance(len(batch))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[[int], None]  # advance(n): n more units of the task are done


class Reporter:
    """Receives progress from long steps. Every method may be overridden; none must be."""

    def message(self, text: str) -> None:
        """A line for the user; warnings start with "warning: "."""

    def dataset(self, ds: Any) -> None:
        """The data a step is about to work on, a petal.data.Dataset (shown before the slow part
        starts). Not imported here: petal.data reports through this module."""

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Advance]:
        """A task of `total` units; yields advance(n)."""
        yield lambda n: None


def rate(done: float, seconds: float) -> float:
    """Units per second since a task started, to one decimal: what its bar shows at the end
    and what its summary (e.g. `images_per_second` in metrics.json) records."""
    return round(done / seconds, 1) if seconds > 0 else 0.0
