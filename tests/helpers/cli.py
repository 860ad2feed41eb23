"""Run ``ctrlkit`` in this process, as its console script would, and read what it printed to stderr."""

from __future__ import annotations


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """``ctrlkit <argv>`` -> (exit status, the non-empty lines of stderr)."""
    from lightning_modules.commands.entry import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]
