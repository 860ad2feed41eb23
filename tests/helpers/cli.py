"""Run ``ctrlkit`` in this process, as its console script would, and read what it printed to stderr (the ``cli``
fixture of tests/conftest.py runs it from a test's tmp_path)."""

from __future__ import annotations

import sys


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """``ctrlkit <argv>`` -> (exit status, the non-empty lines of stderr). A command that reaches Hydra writes its run
    folder under the working directory (or ``CTRLKIT_OUTPUTS``), so a test points those at its tmp_path; the
    process's ``sys.argv`` and the CLI's ``LAUNCH_ARGV``, which a command sets, are put back."""
    from lightning_modules.commands import cli
    from lightning_modules.commands.entry import main

    saved_argv, saved_launch = list(sys.argv), list(cli.LAUNCH_ARGV)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv[:], cli.LAUNCH_ARGV[:] = saved_argv, saved_launch
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]


def the_error_line(command: str, code: int, lines: list[str]) -> str:
    """The one line a refused ``ctrlkit <command>`` printed: exit status 2, no traceback, exactly one line naming an
    error, and it starts ``ctrlkit <command>: error: ``."""
    assert code == 2, lines[-5:]
    assert not any(line.startswith("Traceback") for line in lines), lines
    (line,) = [line for line in lines if "error" in line.lower()]
    assert line.startswith(f"ctrlkit {command}: error: "), line
    return line
