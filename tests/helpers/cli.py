"""Run ``ctrlkit`` in this process, as its console script would, and read what it printed to stderr."""

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
