"""The README's install facts follow pyproject.toml (issue 22 item 20)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_extra_is_in_the_readme_table_and_all_says_what_it_brings():
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = dict(re.findall(r"^(\w+) = (\[.*?\])$", section, re.M | re.S))  # no tomllib before Python 3.11
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): line for line in readme.splitlines() if (m := re.match(r"\|.*\| `petal\[(\w+)\]` \|", line))}
    assert set(extras) <= set(rows), f"extras missing from the README table: {set(extras) - set(rows)}"
    included = re.search(r"petal\[([\w,]+)\]", extras["all"]).group(1).split(",")
    assert all(name in rows["all"] for name in included), rows["all"]  # e.g. bf16 brings OpenVINO
    assert "OpenVINO" in rows["all"] and "GB" in rows["all"]
    assert re.search(r"tests take about \d+ minutes", readme)
