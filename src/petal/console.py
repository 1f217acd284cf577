"""What the `petal` command prints: text, never markup nor terminal control.

Labels, paths and file names come from the user's data, which may hold `[/red]` (rich
markup: a crash, or text restyled), ESC sequences (they would drive the terminal: move the
cursor, retitle the window, hide what follows), or bytes that are not UTF-8. `SafeConsole`
is the one place that makes them harmless: markup and emoji codes are off for everything
printed, and every control character is shown as an escape (`\\x1b`), so a file name reads
as it is. Styling is given as `style=`, never inside the text.
"""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.text import Text

# C0 controls but tab and line feed, DEL, C1 controls, lone surrogates (a name that is not
# UTF-8, decoded with surrogateescape), and the bidirectional overrides that reorder text
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def _shown(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every control character (and lone surrogate) written as its escape."""
    return _CONTROL.sub(_shown, text)


def plain_markup(text: str) -> str:
    """`text` for a place that reads rich markup whatever the console says (a progress bar's
    description): control characters shown, markup escaped."""
    return escape(visible(text))


class SafeConsole(Console):
    """A rich Console whose strings are shown as they are (see the module's docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, emoji=False, **kwargs)

    def render_str(self, text: str, **kwargs) -> Text:
        # every string printed, table cells and titles included, passes here
        return super().render_str(visible(text), **kwargs)
