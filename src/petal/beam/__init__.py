"""`--runner beam`: petal's embedding and batch prediction as Apache Beam pipelines.

`petal.beam.jobs` is the launcher side (options, staging, the pipelines,
`beam_embed`, `beam_predict`, `run`); `petal.beam.transforms` is what runs on
the workers. See docs/beam.md.

Apache Beam is an optional dependency (`pip install 'petal[beam]'`); only
this package imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from petal.errors import PetalError

try:
    import apache_beam  # noqa: F401 - checked here, before any submodule needs it
except ImportError:  # the CLI prints this as a one-line error
    raise PetalError("--runner beam needs Apache Beam: pip install 'petal[beam]'") from None

if TYPE_CHECKING:
    from petal.beam.jobs import PetalOptions, beam_embed, beam_predict, run

__all__ = ["PetalOptions", "beam_embed", "beam_predict", "run"]


def __getattr__(name: str) -> Any:
    # Lazy: importing jobs here would make `python -m petal.beam.jobs` load it
    # twice, as petal.beam.jobs and as __main__ (runpy warns of exactly that).
    if name in __all__:
        from petal.beam import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
