"""Process-wide state (warnings filters, the matplotlib backend) belongs to whoever owns
the process: importing petal, or calling it as a library, leaves it alone; the CLI,
which owns its process, silences Pillow's warnings about damaged files."""

import subprocess
import sys
import textwrap

# Third-party modules first: numpy and scipy add warnings filters of their own on import.
PRELUDE = """
import sys, warnings
import matplotlib, matplotlib.backends.backend_agg, matplotlib.figure
import numpy as np, PIL.Image, PIL.ImageOps, PIL.PngImagePlugin, sklearn.metrics
filters = list(warnings.filters)
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # get_backend() would resolve it
"""


def run_python(code: str, *args: str) -> None:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(code), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_and_library_calls_leave_warnings_and_backend_alone(tmp_path):
    run_python("""
        from pathlib import Path
        import petal, petal.images, petal.metrics
        assert warnings.filters == filters, "importing petal changed warnings.filters"

        classes = ["a", "b", "c"]
        y = np.array([0, 1, 2, 2])
        probs = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
        metrics = petal.metrics.compute_metrics(y, probs, classes)
        petal.metrics.write_report(Path(sys.argv[1]), metrics, classes, ["w", "x", "y", "z"], y, probs)
        assert (Path(sys.argv[1]) / "confusion_matrix.png").stat().st_size > 0
        assert warnings.filters == filters, "writing a report changed warnings.filters"
        assert "matplotlib.pyplot" not in sys.modules, "writing a report imported pyplot"
        assert dict.__getitem__(matplotlib.rcParams, "backend") is backend, "a backend was selected"
    """, str(tmp_path / "report"))


def test_cli_main_silences_pillow_warnings():
    run_python("""
        from petal import cli
        assert warnings.filters == filters
        sys.argv = ["petal", "--help"]
        try:
            cli.main()
        except SystemExit:
            pass
        ignored = {f[2] for f in warnings.filters if f[0] == "ignore"}
        assert {UserWarning, PIL.Image.DecompressionBombWarning} <= ignored, warnings.filters
    """)
