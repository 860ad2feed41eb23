"""The README's two quick-start commands are exactly what CI runs, and every folder in its map exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, "the README's quick start must have exactly two commands"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, f".ci/run does not run the README command: {command}"


def test_folder_map_is_true():
    text = (ROOT / "README.md").read_text()
    folder_map = text.split("## Folder map", 1)[1].split("```")[1]
    for name in re.findall(r"^([\w.]+/?)\s", folder_map, flags=re.M):
        assert (ROOT / name.rstrip("/")).exists(), f"README folder map names {name}, which does not exist"
