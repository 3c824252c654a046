"""README.md's table of built-in rules is the one the registry renders."""

from __future__ import annotations

import textwrap
from pathlib import Path

from graft.optim.rules.table import BEGIN, END, rule_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_holds_the_rule_table_the_registry_renders():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs {BEGIN} ... {END}"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    # The block may sit indented (inside a list item): compare it dedented, line for line.
    found = textwrap.dedent(block.strip("\n")).rstrip()
    stale = "README.md's rule table is stale: paste in `python -m graft.optim.rules.table`"
    assert found == rule_table(), stale
