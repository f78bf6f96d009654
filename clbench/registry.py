"""Registries of streams, strategies and models, looked up by name.

Built-in entries live in ``clbench.streams`` and ``clbench.strategies`` (the folders
``streams/`` and ``strategies/`` at the repository root)
and in :mod:`clbench.models`; they are imported lazily, the first time a
registry is read, so the core never imports a concrete stream or strategy at
module level. A user's own class registers with the same decorators from any
file; :func:`load_plugin` imports such a file (the CLI's ``--plugin``).
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from clbench.errors import ClbenchError

_REGISTRIES: dict[str, dict[str, Any]] = {"stream": {}, "strategy": {}, "model": {}}
_builtins_loaded = False


def _register(kind: str, name: str) -> Callable[[Any], Any]:
    def decorator(obj: Any) -> Any:
        _REGISTRIES[kind][name] = obj
        if isinstance(obj, type):
            obj.name = name
        return obj

    return decorator


def register_stream(name: str) -> Callable[[Any], Any]:
    """Register a function ``(**args) -> Stream`` under ``name``."""
    return _register("stream", name)


def register_strategy(name: str) -> Callable[[Any], Any]:
    """Register a :class:`clbench.Strategy` subclass under ``name``."""
    return _register("strategy", name)


def register_model(name: str) -> Callable[[Any], Any]:
    """Register a function ``(input_shape, num_outputs, **args) -> nn.Module`` under ``name``."""
    return _register("model", name)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in ("clbench.models", "clbench.streams", "clbench.strategies"):
            importlib.import_module(module)


def names(kind: str) -> list[str]:
    """Sorted registered names of one kind: 'stream', 'strategy' or 'model'."""
    _load_builtins()
    return sorted(_REGISTRIES[kind])


def lookup(kind: str, name: str) -> Any:
    """The registered object, or a ClbenchError listing the known names."""
    _load_builtins()
    registry = _REGISTRIES[kind]
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ClbenchError(
            f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(sorted(registry))} "
            f"(see `clbench list`; register your own with clbench.register_{kind})"
        )
    return registry[name]


def arguments(obj: Any) -> dict[str, Any]:
    """Keyword arguments with their defaults, from a function's or class's signature."""
    target = obj.__init__ if isinstance(obj, type) else obj
    params: dict[str, Any] = {}
    classes = obj.__mro__ if isinstance(obj, type) else ()
    for fn in [target] + [c.__init__ for c in classes[1:] if "__init__" in vars(c)]:
        for p in inspect.signature(fn).parameters.values():
            if p.name in ("self", "input_shape", "num_outputs") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            params.setdefault(p.name, None if p.default is inspect.Parameter.empty else p.default)
    return params


def describe(obj: Any) -> str:
    """First line of the docstring."""
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def check_arguments(kind: str, name: str, obj: Any, given: dict[str, Any]) -> None:
    """Raise a ClbenchError if ``given`` has a key ``obj`` does not take."""
    known = arguments(obj)
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ClbenchError(
                f"{kind} {name!r} has no argument {key!r}.{hint} "
                f"Its arguments: {', '.join(f'{k}={v!r}' for k, v in known.items()) or 'none'}"
            )


def parse_key_values(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """Parse ``["key=value", ...]``; values are Python literals, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ClbenchError(f"malformed {what} {pair!r}: expected KEY=VALUE, e.g. rho_a=0.5")
        raw = raw.strip()
        lowered = raw.lower()
        if lowered in ("true", "false"):
            value: Any = lowered == "true"
        elif lowered in ("none", "null"):
            value = None
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key] = value
    return out


LOADED_PLUGINS: list[str] = []  # what load_plugin imported (files as absolute paths), for sweep workers to repeat


def load_plugin(spec: str) -> None:
    """Import a user's file (``path/to/file.py``) or module so its registrations run; once per spec."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise ClbenchError(f"plugin file {spec!r} not found; pass the path of a .py file that registers your code")
        spec = str(path.resolve())
    if spec in LOADED_PLUGINS:
        return
    if spec.endswith(".py"):
        module_name = f"clbench_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(spec)
        except ModuleNotFoundError as e:
            raise ClbenchError(f"plugin module {spec!r} cannot be imported ({e}); pass a module on PYTHONPATH or a .py file") from None
    LOADED_PLUGINS.append(spec)
