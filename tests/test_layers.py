"""The package's shape: every import inside parakeet_worker points down the layer order
(parakeet_worker.LAYERS) or stays in its layer, and no imports make a cycle. Read from the code's
own import statements (those inside functions too), so a new module or import is checked the
day it is written."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import parakeet_worker

PACKAGE = Path(parakeet_worker.__file__).parent


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name under parakeet_worker ("audio.disk")."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        found[".".join(path.relative_to(PACKAGE).with_suffix("").parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports, however it spells them."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("parakeet_worker"):
            base = node.module.removeprefix("parakeet_worker").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                out.add(name if name in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("parakeet_worker."):
                    out.add(alias.name.removeprefix("parakeet_worker."))
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) for name, path in mods.items()}


def layer_of() -> dict[str, int]:
    return {module: n for n, layer in enumerate(parakeet_worker.LAYERS) for module in layer}


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(layer_of()))
    assert not missing, f"add these to parakeet_worker.LAYERS: {missing}"
    gone = sorted(set(layer_of()) - set(modules()))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


def test_imports_point_down_the_layers():
    layers = layer_of()
    upward = [(m, dep) for m, deps in graph().items() for dep in deps if layers[dep] > layers[m]]
    assert not upward, f"imports that point up the layer order (module -> what it imports): {upward}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                return [*path, node, dep]
            if dep not in state and (cycle := visit(dep, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module, [])):
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")


def test_the_package_never_imports_the_entry_point():
    """handler.py wires the package; nothing in the package imports it back (the old
    handler <-> server cycle)."""
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert "handler" not in names and not (isinstance(node, ast.ImportFrom) and node.module == "handler"), name


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check itself: a module of the base layer that imports the job layer is caught."""
    fake = tmp_path / "errors.py"
    fake.write_text("from parakeet_worker import job\nfrom parakeet_worker.audio import disk as d\n")
    deps = imports_of(fake, set(modules()))
    layers = layer_of()
    assert deps == {"job", "audio.disk"}
    assert {d for d in deps if layers[d] > layers["errors"]} == deps


def test_a_patch_of_a_name_handler_only_imports_is_refused(worker, monkeypatch):
    """conftest's guard: patching handler.config (an import) would change nothing the worker
    runs, so it fails the test that tries; a name handler.py defines can be patched."""
    with pytest.raises(AssertionError, match=r"only imported by handler\.py"):
        monkeypatch.setattr(worker, "config", None)
    with pytest.raises(AssertionError, match=r"only imported by handler\.py"):
        monkeypatch.setattr("handler.asr", None)
    monkeypatch.setattr(worker, "_plan_next", worker._plan_next)


def test_importing_any_module_reads_no_setting_and_starts_nothing(tmp_path):
    """In a fresh process: handler and every module of the package imported; our code reads no
    environment variable, starts no thread, adds no audit hook; no heavy library comes with
    them (the HTTP layer only with http_server, which is imported last on purpose here)."""
    import json
    import subprocess
    import sys

    report = tmp_path / "imports.json"
    proc = subprocess.run([sys.executable, "tests/workers.py", "import-all", str(report)], cwd=PACKAGE.parent,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(report.read_text())
    assert seen["modules"] >= 25
    assert seen["env_read"] == [] and seen["threads_started"] == 0 and seen["audit_hooks"] == 0, seen
    assert [m for m in seen["heavy"] if not m.startswith("fastapi")] == [], seen["heavy"]
