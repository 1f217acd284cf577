"""What `petal` prints: labels, paths and file names as text, never markup or terminal control."""

import io

from PIL import Image

from petal.console import SafeConsole, plain_markup, visible


def test_visible_shows_control_characters_as_escapes():
    assert visible("a\x1b]0;owned\x07b\r\x9b") == "a\\x1b]0;owned\\x07b\\x0d\\x9b"
    assert visible("tab\tand\nline [/red] é 名") == "tab\tand\nline [/red] é 名"
    assert visible("caf\udce9.jpg") == "caf\\xe9.jpg"  # a name that is not UTF-8 (surrogateescape)
    assert visible("\u202egpj.exe") == "\\u202egpj.exe"
    assert plain_markup("listing /data/[/bold]x") == "listing /data/\\[/bold]x"


def test_the_console_prints_markup_and_escapes_as_text():
    buf = io.StringIO()
    console = SafeConsole(file=buf, width=200)
    console.print("x[/red]y :smile: \x1b[2J", style="yellow")
    assert buf.getvalue() == "x[/red]y :smile: \\x1b[2J\n"


def test_cli_tables_and_bars_show_hostile_labels_and_paths(tmp_path):
    """A label `x[/red]y` crashed `petal train` (MarkupError in the data table), a path holding
    `[/bold]` `petal predict`'s table, and a folder's name in a progress bar would too."""
    from petal.cli import render as cli
    from petal.data import Dataset, Example
    from petal.predictions import Prediction

    ds = Dataset([Example("/d/a.png", "x[/red]y", "train"), Example("/d/b.png", "b\x1b[31m", "eval")],
                 ["b\x1b[31m", "x[/red]y"])
    p = Prediction("/d/[/bold]\x1b[2J.png", nearest="x[/red]y", nearest_score=0.9, top=[("x[/red]y", 0.9)])
    with cli.out.capture() as cap:
        cli.print_dataset(ds)
        cli.print_predictions([p])
    text = cap.get()
    assert "x[/red]y" in text and "b\\x1b[31m" in text and "/d/[/bold]\\x1b[2J.png" in text
    assert "\x1b" not in text
    with cli.err.capture(), cli.RichReporter().progress(f"listing {tmp_path}/[/bold]", 1) as advance:
        advance(1)


def test_cli_prints_file_names_as_text_and_reads_brackets_as_a_path(tmp_path, cache_dir):
    """`p[1].png` is a file before it is a glob pattern; an ESC in a name never reaches the terminal."""
    from test_cli import petal

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "p[1].png")
    Image.new("RGB", (64, 64), (30, 200, 30)).save(tmp_path / "[bold]q.png")
    (tmp_path / "e\x1b[2Jvil.png").write_bytes(b"not an image")
    r = petal("classify", tmp_path / "p[1].png", tmp_path / "[bold]q.png", tmp_path / "e\x1b[2Jvil.png")
    assert f"{tmp_path}/p[1].png" in r.stdout and f"{tmp_path}/[bold]q.png" in r.stdout
    assert f"{tmp_path}/e\\x1b[2Jvil.png: error: not an image" in r.stderr.replace("\n", "")
    assert "\x1b" not in r.stdout + r.stderr
