"""Imports flow one way: inference code (formats, ops, nn, io and the shared leaf modules) never
imports a training stage (calibration, pruning, reconstruction, structure) or the package root."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparsenet"
TRAINING = ("calibration", "pruning", "reconstruction", "structure")
# each inference area, and the other sparsenet modules it must not import
RULES = {
    "formats": (*TRAINING, "nn", "ops", "io", "cli"),
    "ops": (*TRAINING, "nn", "io", "cli"),
    "nn": (*TRAINING, "io", "cli"),
    "io.py": (*TRAINING, "cli"),
    "_*.py": (*TRAINING, "io", "cli"),
}


def sparsenet_imports(path: Path) -> set[str]:
    """The sparsenet submodules a file imports (absolute or relative, at any depth in the file)."""
    found = set()
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names] if base == "sparsenet" else [base]
        else:
            continue
        found |= {n.split(".")[1] if n.count(".") else "" for n in names if n.startswith("sparsenet")}
    return found


def files(area: str) -> list[Path]:
    if area.endswith(".py"):  # top-level modules (not the package root, which imports everything)
        return sorted(f for f in PACKAGE.glob(area) if f.name != "__init__.py")
    return sorted((PACKAGE / area).rglob("*.py"))


@pytest.mark.parametrize("area", sorted(RULES))
def test_inference_code_imports_no_training_stage(area):
    assert files(area), area
    bad = {str(f.relative_to(PACKAGE)): sorted(sparsenet_imports(f) & set(RULES[area])) for f in files(area)}
    assert not {f: mods for f, mods in bad.items() if mods}


def test_the_check_sees_relative_and_late_imports():
    inner = PACKAGE / "nn" / "linear.py"
    assert "_masks" in sparsenet_imports(inner) and "ops" in sparsenet_imports(inner)
    assert "structure" in sparsenet_imports(PACKAGE / "structure" / "api.py")  # from .graph import ...
    assert "pruning" in sparsenet_imports(PACKAGE / "structure" / "api.py")  # from ..pruning.scope import ...
