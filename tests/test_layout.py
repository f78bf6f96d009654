"""The package's layout: every module imports on its own, layers depend one way, no private names cross modules."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import clbench

ROOT = Path(clbench.__file__).resolve().parent
REPO = ROOT.parent
# lower layers never import higher ones; streams and strategies plug in between
LAYER = {"core": 0, "data": 1, "models": 1, "fisher": 1, "batched": 2, "streams": 3, "strategies": 3,
         "experiments": 4, "reporting": 5, "benchmark": 5, "cli": 6, "reproduce": 6}
# calls that reach upward on purpose, made inside a function (never at import time)
UPWARD = {("core.types", "data.export"): "Stream.to_torch / to_avalanche delegate to the exporters"}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, with its source file."""
    found = {}
    for base, package in ((ROOT, "clbench"), (REPO / "streams", "clbench.streams"),
                          (REPO / "strategies", "clbench.strategies")):
        for path in sorted(base.rglob("*.py")):
            if package == "clbench" and path.relative_to(base).parts[0] in ("streams", "strategies"):
                continue
            parts = path.relative_to(base).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1]) if len(parts) > 1 else None


def test_top_level_holds_only_entry_modules():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py", "__main__.py", "benchmark.py"]
    assert len([p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]) <= 12


# One interpreter that loads the third-party libraries once, then imports each clbench module in a child forked
# before any clbench module is loaded: as good as a fresh interpreter for import cycles, and a second a module.
ONE_BY_ONE = """
import importlib, os, sys
for library in ("torch", "numpy", "pandas", "tqdm"):
    importlib.import_module(library)
assert not any(m == "clbench" or m.startswith("clbench.") for m in sys.modules)
failed = 0
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            os._exit(1)
        os._exit(0)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """An import cycle shows when the module that starts it is imported first."""
    names = sorted(n for n in modules() if n != "clbench.__main__")  # __main__ runs the command line
    if hasattr(os, "fork"):
        out = subprocess.run([sys.executable, "-c", ONE_BY_ONE, *names], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stdout + out.stderr[-2000:]
        return
    for name in names:  # no fork: one interpreter a module
        out = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, f"{name}: {out.stderr[-2000:]}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_layers_depend_one_way_and_private_names_stay_home(name):
    path = modules()[name]
    tree = ast.parse(path.read_text())
    here = layer(name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            target, names = node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = None, []
            for alias in node.names:
                if alias.name.startswith("clbench."):
                    target = alias.name
        else:
            continue
        if not target or not target.startswith("clbench"):
            continue
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{name} imports private {private} from {target}"
        there = layer(target if target != "clbench" else "clbench.x")
        key = (".".join(name.split(".")[1:3]), ".".join(target.split(".")[1:3]))
        if here is not None and there is not None and key not in UPWARD:
            assert there <= here, f"{name} (layer {here}) imports {target} (layer {there})"
