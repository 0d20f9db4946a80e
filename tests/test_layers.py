"""metaopt's parts import one way: optimizers, tasks -> config -> meta -> evaluate, distributed, tracking
-> the after-training pipeline and the public API -> tune, benchmark, ray_jobs -> cli. Ray and MLflow stay at
the edges."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metaopt"
LAYER = {
    "optimizers": 0,
    "tasks": 0,
    "config": 1,
    "meta": 2,
    "evaluate": 3,
    "distributed": 3,
    "tracking": 3,
    "pipeline": 4,
    "api": 4,
    "tune": 5,
    "benchmark": 5,
    "ray_jobs": 5,
    "cli": 6,
    "__init__": 7,
}
# The edges: the learner's loop and the Ray workers never write to MLflow.
# benchmark: resolves --optimizer sources; ray_jobs: checks a Ray job's MLflow store
MAY_IMPORT_TRACKING = {"pipeline", "api", "tune", "benchmark", "ray_jobs", "cli"}
MAY_IMPORT = {"ray": {"distributed", "tune", "cli"}, "mlflow": {"tracking", "cli"}}


def imports() -> dict[str, set[str]]:
    """Each top-level module or subpackage of metaopt -> the metaopt parts, ray and mlflow it imports."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top, _, rest = name.partition(".")
                target = rest.split(".")[0] if top == "metaopt" and rest else top
                if top in MAY_IMPORT or (top == "metaopt" and rest):
                    found.setdefault(part, set()).add(target)
    return found


def test_every_part_of_metaopt_has_a_layer():
    parts = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert parts - {"__pycache__"} <= set(LAYER), f"parts without a layer: {parts - set(LAYER)}"


def test_imports_go_one_way():
    upward = sorted(
        f"{part} -> {target}"
        for part, targets in imports().items()
        for target in targets
        if target in LAYER and target != part and LAYER[target] >= LAYER[part]
    )
    assert not upward, f"imports against the layers (or within one layer): {upward}"


def test_tracking_is_imported_only_from_the_edges():
    found = sorted(part for part, targets in imports().items() if "tracking" in targets and part != "tracking")
    assert set(found) <= MAY_IMPORT_TRACKING, f"tracking imported by {found}"


def test_ray_and_mlflow_stay_at_the_edges():
    for library, allowed in MAY_IMPORT.items():
        found = sorted(part for part, targets in imports().items() if library in targets)
        assert set(found) <= allowed, f"{library} imported by {set(found) - allowed}"


def test_no_part_uses_another_parts_private_names():
    """``_name``s are a part's own: another part neither imports them nor reaches them through an import."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        foreign = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("metaopt."):
                if node.module.split(".")[1] != part:
                    foreign |= {alias.asname or alias.name for alias in node.names}
                    found += [f"{path.name}: {alias.name}" for alias in node.names if _private(alias.name)]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in foreign:
                if _private(node.attr):
                    found.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not found, f"private names used across parts: {found}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")
