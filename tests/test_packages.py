"""The imported packages are this project's (PyPI has unrelated `adapters` and `conditions`), and imports flow
lightning_modules -> adapters, conditions only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "adapters": {"conditions", "lightning_modules", "pytorch_lightning", "lightning", "hydra", "omegaconf", "wandb"},
    "conditions": {"adapters", "lightning_modules", "pytorch_lightning", "lightning", "hydra", "omegaconf", "wandb"},
}


@pytest.mark.parametrize("package", ["adapters", "conditions", "lightning_modules", "conf"])
def test_imported_package_is_ours(package):
    module = __import__(package)
    assert Path(module.__file__).resolve().parent == ROOT / package


def imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    for path in (ROOT / package).rglob("*.py"):
        assert not imported_top_level(path) & FORBIDDEN[package], (
            f"{path} imports {imported_top_level(path) & FORBIDDEN[package]}"
        )


def test_torch_and_torchvision_work_together():
    """A mismatched pair imports but fails here with 'operator torchvision::nms does not exist'."""
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
