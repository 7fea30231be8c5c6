"""`--help` of every command reads well in an 80-column terminal or a pipe: no line over 80
columns, every option's help in a column of at least 40 characters, the examples of the
docstring shown whole; `sslctl --help` lists the commands in the pipeline's order."""

from __future__ import annotations

import inspect
import re

import pytest

from sslctl.cli import ORDER, app
from tests.conftest import run_cli

COMMANDS = {info.name: info.callback for info in app.registered_commands}


def help_text(*args: str) -> str:
    res = run_cli(*args, "--help", env={"COLUMNS": "80", "LINES": "40"})
    assert res.returncode == 0, res.stderr
    return res.stdout


def examples(callback) -> list[str]:
    """The command lines of the docstring's Example(s) section, one per line as written."""
    doc = inspect.getdoc(callback)
    section = re.split(r"\n\s*Examples?:", doc, maxsplit=1)
    assert len(section) == 2, "the docstring has no Example section"
    return [line.strip() for line in section[1].splitlines() if line.strip().startswith(("sslctl ", "torchrun "))]


def option_help_columns(text: str, callback) -> dict[str, int]:
    """{flag: how many columns its help text gets}: from where its first word starts (on the
    flag's line, or on the next when the flag is too long) to column 80."""
    lines = text.splitlines()
    widths = {}
    for param in inspect.signature(callback).parameters.values():
        info = param.default
        flags = [d.split("/")[0] for d in info.param_decls or () if d.startswith("--")]
        if not flags or not info.help:
            continue
        first = info.help.split()[0]
        for i, line in enumerate(lines):
            at = line.find(flags[0])
            if at < 0 or not re.match(r"[\s,]|$", line[at + len(flags[0]) :] or " "):
                continue
            for candidate, start in ((line, at + len(flags[0])), (lines[i + 1] if i + 1 < len(lines) else "", 0)):
                col = candidate.find(first, start)
                if col >= 0:
                    widths[flags[0]] = 80 - col
                    break
            break
    return widths


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_fits_80_columns(name):
    text = help_text(name)
    long = [line for line in text.splitlines() if len(line) > 80]
    assert not long, f"sslctl {name} --help: {len(long)} lines over 80 columns, e.g. {long[0]!r}"
    widths = option_help_columns(text, COMMANDS[name])
    assert widths, text
    narrow = {flag: w for flag, w in widths.items() if w < 40}
    assert not narrow, f"sslctl {name} --help: option help squeezed into columns narrower than 40: {narrow}"
    lines = {line.strip() for line in text.splitlines()}
    missing = [cmd for cmd in examples(COMMANDS[name]) if cmd not in lines]
    assert not missing, f"sslctl {name} --help: examples not shown whole: {missing}"


def test_top_level_help_lists_the_commands_in_order():
    text = help_text()
    assert max(map(len, text.splitlines())) <= 80
    after = text[text.index("Commands"):]
    listed = [m.group(1) for m in re.finditer(r"^[\s│]+([a-z][\w-]*)\s{2,}\S", after, re.M) if m.group(1) in COMMANDS]
    assert listed == [n for n in ORDER if n in COMMANDS], listed
