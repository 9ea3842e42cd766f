"""The package's structure: imports go one way, and the registry never hands out an untrained NAMM."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from namm.errors import NammError
from namm.policies import make_policy, registered

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "namm").rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def _imports(name: str, file: Path, modules: dict[str, Path], top_level: bool) -> set[str]:
    """The namm modules ``name`` imports (at import time only, or anywhere in the file)."""
    tree = ast.parse(file.read_text())
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in modules and m != name}


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: _imports(m, f, modules, top_level=True) for m, f in modules.items()}
    assert len(graph) > 30
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle at import time: {err.args[1]}")


def test_attention_owns_the_handoff_and_imports_nothing_from_the_cache():
    modules = _modules()
    assert "namm.cache" not in _imports("namm.attention", modules["namm.attention"], modules, top_level=False)
    assert "namm.attention" in _imports("namm.cache", modules["namm.cache"], modules, top_level=True)


def test_the_runtime_core_knows_nothing_of_the_cache_above_it_or_of_populations():
    """The store and the step module never reach up to the cache; no core module imports namm.evolution."""
    modules = _modules()
    for name in ("namm.store", "namm.step"):
        assert "namm.cache" not in _imports(name, modules[name], modules, top_level=False), name
    for name in ("namm.attention", "namm.cache", "namm.engine", "namm.store", "namm.step", "namm.policies.base"):
        assert not any(m.startswith("namm.evolution") for m in _imports(name, modules[name], modules, False)), name
    assert "namm.store" in _imports("namm.cache", modules["namm.cache"], modules, top_level=True)


def test_make_policy_namm_loads_a_checkpoint_or_says_why_not(tmp_path):
    assert "namm" in registered()
    memory = make_policy("namm", budget=0.5)
    assert memory.get_params().abs().sum() > 0, "the bundled memory, not an untrained keep-all NAMM"
    assert memory.active_budget == 0.5
    with pytest.raises(NammError, match="No NAMM checkpoint"):
        make_policy("namm", checkpoint=str(tmp_path / "missing"))
    with pytest.raises(NammError, match="no option"):
        make_policy("namm", window=3)
