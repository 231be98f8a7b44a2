"""The README's quick start and CI must not drift apart: CI runs the README's commands verbatim."""

from __future__ import annotations

import re

from conftest import REPO


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]


def test_quick_start_is_two_commands_run_verbatim_by_ci():
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert commands[0].endswith("smallcoder train") and "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in commands:
        assert command in ci, f".ci/run does not run the README command verbatim: {command}"


def test_help_lists_every_subcommand(capsys):
    import pytest

    from smallcoder.cli import build_parser, main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for name in subcommands:
        assert name in out
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in subcommands:
        assert f"smallcoder {name}" in readme, f"README does not document `smallcoder {name}`"
