"""Registries of streams, strategies and models, looked up by name.

Built-in entries live in ``clbench.streams`` and ``clbench.strategies`` (the folders
``streams/`` and ``strategies/`` at the repository root)
and in :mod:`clbench.models.networks`; they are imported lazily, the first time a
registry is read, so the core never imports a concrete stream or strategy at
module level. A user's own class registers with the same decorators from any
file; :func:`load_plugin` imports such a file (the CLI's ``--plugin``).
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

from clbench.core.errors import ClbenchError, warn

_REGISTRIES: dict[str, dict[str, Any]] = {"stream": {}, "strategy": {}, "model": {}}
_builtins_loaded = False


def _identity(obj: Any) -> tuple[str, str, str | None]:
    """What makes two registered objects "the same": module, qualified name and the module's file.

    Importing a module twice (a reload, or a plugin file loaded again) creates a new
    class object with the same identity; that is not a clash.
    """
    module = getattr(obj, "__module__", None) or ""
    return module, getattr(obj, "__qualname__", repr(obj)), getattr(sys.modules.get(module), "__file__", None)


def _describe_owner(obj: Any) -> str:
    module, qualname, path = _identity(obj)
    return f"{module}.{qualname}" + (f" in {path}" if path and not module.startswith("clbench.") else "")


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
NAME_RULE = "letters, digits, '-', '_', '+' and '.', starting with a letter or digit, at most 100 characters"


def check_name(kind: str, name: Any) -> str:
    """``name`` if it is a valid name of a ``kind`` (stream, strategy, model, suite), else a ClbenchError.

    Names become parts of file names (a run's record, a tuning summary), so they are restricted to
    NAME_RULE: no '/', no '..', nothing a path could be made to escape with.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ClbenchError(f"{kind} name {name!r} is not allowed: a name has {NAME_RULE} (e.g. 'my-ewc_v2')")
    return name


def _register(kind: str, name: str, replace: bool = False) -> Callable[[Any], Any]:
    check_name(kind, name)

    def decorator(obj: Any) -> Any:
        if not str(getattr(obj, "__module__", "")).startswith("clbench."):
            _load_builtins()  # so a user's name is checked against the built-in ones, whatever the import order
        registry = _REGISTRIES[kind]
        old = registry.get(name)
        if old is not None and old is not obj and _identity(old) != _identity(obj):
            if not replace:
                raise ClbenchError(
                    f"{kind} name {name!r} is already registered by {_describe_owner(old)}; "
                    f"{_describe_owner(obj)} cannot take it. Pick another name, or replace it explicitly "
                    f"with @register_{kind}({name!r}, replace=True)")
            warn(f"{kind} {name!r} of {_describe_owner(old)} is replaced by {_describe_owner(obj)} "
                 f"(register_{kind}(..., replace=True))")
        registry[name] = obj
        if isinstance(obj, type):
            obj.name = name
        return obj

    return decorator


def register_stream(name: str, replace: bool = False) -> Callable[[Any], Any]:
    """Register a function ``(**args) -> Stream`` under ``name``.

    Names are unique: taking a name that is registered already (a built-in such as
    ``permuted-mnist``, or another plugin's) is an error unless ``replace=True``,
    which replaces it with a warning.
    """
    return _register("stream", name, replace)


def register_strategy(name: str, replace: bool = False) -> Callable[[Any], Any]:
    """Register a :class:`clbench.Strategy` subclass under ``name`` (unique; ``replace=True`` to override one)."""
    return _register("strategy", name, replace)


def register_model(name: str, replace: bool = False) -> Callable[[Any], Any]:
    """Register a function ``(input_shape, num_outputs, **args) -> nn.Module`` under ``name`` (unique; see
    ``register_stream`` for ``replace``)."""
    return _register("model", name, replace)


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


def _parameters(fn: Callable) -> tuple[inspect.Parameter, ...]:
    """inspect.signature's parameters, once per function (a sweep checks every cell's arguments: 0.3 ms each)."""
    try:
        return _signature_parameters(fn)
    except TypeError:  # an unhashable callable (or not a callable: signature raises that itself)
        return tuple(inspect.signature(fn).parameters.values())


@functools.lru_cache(maxsize=None)
def _signature_parameters(fn: Callable) -> tuple[inspect.Parameter, ...]:
    return tuple(inspect.signature(fn).parameters.values())


def arguments(obj: Any) -> dict[str, Any]:
    """Keyword arguments with their defaults, from a function's or class's signature."""
    target = obj.__init__ if isinstance(obj, type) else obj
    params: dict[str, Any] = {}
    classes = obj.__mro__ if isinstance(obj, type) else ()
    for fn in [target] + [c.__init__ for c in classes[1:] if "__init__" in vars(c)]:
        for p in _parameters(fn):
            if p.name in ("self", "input_shape", "num_outputs") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            params.setdefault(p.name, None if p.default is inspect.Parameter.empty else p.default)
    return params


def describe(obj: Any) -> str:
    """First line of the docstring."""
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def _kind_of(default: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """What a value must be, judged from the argument's default (None: anything goes)."""
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, (int, float)):
        return "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, (list, tuple)):
        return "a list such as (1, 2)", lambda v: isinstance(v, (list, tuple, int))
    if isinstance(default, dict):
        return "a dict such as {'key': 1}", lambda v: isinstance(v, dict)
    return None


def check_arguments(kind: str, name: str, obj: Any, given: dict[str, Any]) -> dict[str, Any]:
    """Raise a ClbenchError if ``given`` has a key ``obj`` does not take, or a value of the wrong kind.

    The kind is judged from the argument's default: a number where the default is a
    number, true/false where it is a bool, and so on (``None`` defaults take anything;
    the builder checks those itself). Returns the arguments to pass: ``given``, with
    true/false turned into the strings "true"/"false" where the default is a string
    (``--strategy-arg fisher=true`` means the word).
    """
    known = arguments(obj)
    out = dict(given)
    for key, value in given.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ClbenchError(
                f"{kind} {name!r} has no argument {key!r}.{hint} "
                f"Its arguments: {', '.join(f'{k}={v!r}' for k, v in known.items()) or 'none'}"
            )
        if isinstance(known[key], str) and isinstance(value, bool):
            out[key] = value = str(value).lower()
        expected = _kind_of(known[key])
        if expected is not None and value is not None and not expected[1](value):
            raise ClbenchError(f"{kind} {name!r}: {key} must be {expected[0]} (default {known[key]!r}), "
                               f"got {value!r}")
    return out


def parse_value(raw: str, what: str, pair: str) -> Any:
    """One ``KEY=VALUE`` value: true/false/none, else a Python literal, else a plain word as a string.

    An empty value, or one that starts like a literal (a bracket or a quote) but does not
    parse, is an error rather than a string nobody meant.
    """
    raw = raw.strip()
    lowered = raw.lower()
    if not raw:
        raise ClbenchError(f"{what} {pair!r} has no value after '='; give one, e.g. {pair}0.5 or {pair}(400,400) "
                           f"(write {pair}'' for an empty string)")
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        if raw[0] in "([{'\"" or raw[-1] in ")]}'\"" or raw[0] in "+-.0123456789" and any(c in raw for c in "(),[]{}"):
            reason = e.msg if isinstance(e, SyntaxError) else str(e)
            raise ClbenchError(f"{what} {pair!r}: {raw!r} is not a valid value ({reason}); write a Python literal "
                               "such as 0.5, (400, 400), [1, 2] or 'text'") from None
        return raw


def parse_key_values(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """Parse ``["key=value", ...]``; values are Python literals, else strings (see :func:`parse_value`)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ClbenchError(f"malformed {what} {pair!r}: expected KEY=VALUE, e.g. rho_a=0.5")
        out[key] = parse_value(raw, what, pair)
    return out


LOADED_PLUGINS: list[str] = []  # what load_plugin imported (files as absolute paths), for sweep workers to repeat


def _import_error(spec: str, e: BaseException) -> ClbenchError:
    """One line for a plugin that fails at import: the file, the line and the error."""
    if isinstance(e, ClbenchError):
        return ClbenchError(f"plugin {spec!r}: {e}")
    if isinstance(e, SyntaxError):
        where = f"{e.filename or spec}, line {e.lineno}" if e.lineno else (e.filename or spec)
        return ClbenchError(f"plugin {spec!r} has a syntax error ({where}: {e.msg}); fix the file")
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return ClbenchError(f"plugin {spec!r} raised {type(e).__name__}: {e}{where} while being imported; fix the "
                        "plugin (run it with python to see the traceback)")


def load_plugin(spec: str) -> None:
    """Import a user's file (``path/to/file.py``) or module so its registrations run; once per spec.

    Any error while importing it (a syntax error, an exception, a clashing name) is a
    ClbenchError naming the plugin, the line and the error.
    """
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
        previous = sys.modules.get(module_name)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - any failure of the user's file is one line
            if previous is None:
                sys.modules.pop(module_name, None)
            else:
                sys.modules[module_name] = previous
            raise _import_error(spec, e) from None
    else:
        try:
            importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if e.name and (spec == e.name or spec.startswith(e.name + ".")):
                raise ClbenchError(f"plugin module {spec!r} cannot be imported ({e}); pass a module on PYTHONPATH "
                                   "or a .py file") from None
            raise _import_error(spec, e) from None
        except Exception as e:  # noqa: BLE001
            raise _import_error(spec, e) from None
    LOADED_PLUGINS.append(spec)


def build_model(name: str, input_shape: tuple[int, ...], num_outputs: int, **args: Any) -> Any:
    """Build a registered model (an ``nn.Module``), checking its arguments."""
    builder = lookup("model", name)
    return builder(tuple(input_shape), int(num_outputs), **check_arguments("model", name, builder, args))
