"""Registry names and constructor signatures, known without importing torch or Lightning.

Every registry of sleepbot (datasets, architectures, optimizers, sleep strategies, forecasters) is filled by one
line next to the thing it registers, `@register_<kind>("name")` (or `register_<kind>("name")(fn)`). The real
registries are dicts in heavy modules (sleepbot.data, sleepbot.models, sleepbot.sleep, sleepbot.forecast); the CLI
must answer a bad name in well under a second, before torch is imported (3-8 s). So this module finds the names
by reading the package's source for those registry lines, and adds the names registered at run time in modules
already imported (a strategy registered in a user's script or a test module). There is no list to keep in step:
a new registry line is usable by name from YAML and the CLI the day it is written.

`signature_params` reads a constructor's parameters (names, annotations, literal defaults) the same way, so the
Sleep callback's signature is the one definition of its settings (see sleepbot.config.SleepConfig).
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent

# kind -> (the registry's module, its dict attribute, the word used in error messages)
KINDS: dict[str, tuple[str, str, str]] = {
    "dataset": ("sleepbot.data", "LOADERS", "dataset"),
    "arch": ("sleepbot.models", "ARCHS", "architecture"),
    "optimizer": ("sleepbot.models", "OPTIMIZERS", "optimizer"),
    "strategy": ("sleepbot.sleep.base", "STRATEGIES", "sleep strategy"),
    "forecaster": ("sleepbot.forecast.base", "FORECASTERS", "forecaster"),
}


def _registry_calls(tree: ast.AST) -> list[tuple[str, str]]:
    """(kind, name) of every `register_<kind>("name")` call in code (docstring examples are not code)."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        arg = node.args[0]
        if func.startswith("register_") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            out.append((func[len("register_") :], arg.value))
    return out


@functools.cache
def _static_names() -> dict[str, tuple[str, ...]]:
    """{kind: names} from the registry lines in the package's source (sorted by file, then source order)."""
    found: dict[str, dict[str, None]] = {k: {} for k in KINDS}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if "register_" not in text:
            continue
        for kind, name in _registry_calls(ast.parse(text)):
            if kind in found:
                found[kind][name] = None
    return {k: tuple(v) for k, v in found.items()}


def names(kind: str) -> tuple[str, ...]:
    """Every name registered for `kind`: the package's registry lines plus run-time registrations in modules
    that are already imported (none is imported here)."""
    if kind not in KINDS:
        raise KeyError(f"unknown registry kind {kind!r}; valid: {', '.join(KINDS)}")
    out = dict.fromkeys(_static_names()[kind])
    module, attr, _ = KINDS[kind]
    live = getattr(sys.modules.get(module), attr, None)
    if isinstance(live, dict):
        out.update(dict.fromkeys(live))
    return tuple(out)


def is_import_path(name: str) -> bool:
    """`package.module.Class` or `package.module:Class`: a user's own class, imported when the run is built."""
    return ("." in name or ":" in name) and all(p.isidentifier() for p in re.split(r"[.:]", name))


def check_name(kind: str, name: Any, *, allow_import_path: bool = False) -> str:
    """`name` if it is registered for `kind` (or, when allowed, an import path); else a one-line ConfigError."""
    from sleepbot.errors import ConfigError

    valid = names(kind)
    if isinstance(name, str) and (name in valid or (allow_import_path and is_import_path(name))):
        return name
    label = KINDS[kind][2]
    extra = ", or an import path such as mypkg.module.MyStrategy" if allow_import_path else ""
    raise ConfigError(f"unknown {label} {name!r}; valid: {', '.join(valid)}{extra}")


# --------------------------------------------------------------------------------------------- signatures
@dataclass(frozen=True)
class Param:
    """One constructor parameter as written in the source: name, annotation text, default (a literal)."""

    name: str
    annotation: str
    default: Any
    required: bool = False


@functools.cache
def signature_params(relpath: str, cls: str, method: str = "__init__") -> tuple[Param, ...]:
    """The keyword parameters of `cls.method` in the package file `relpath`, read with `ast` (no import).

    Defaults must be literals (numbers, strings, None, tuples, lists, dicts): a default that is not is reported as
    a bug here, so a signature that could not be read statically never goes unnoticed.
    """
    tree = ast.parse((PACKAGE / relpath).read_text())
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        raise LookupError(f"no class {cls} in sleepbot/{relpath}")
    fn = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method), None)
    if fn is None:
        raise LookupError(f"no {cls}.{method} in sleepbot/{relpath}")
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    pos_defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = [*zip(positional, pos_defaults), *zip(args.kwonlyargs, args.kw_defaults)]
    out = []
    for arg, default in pairs:
        if arg.arg == "self":
            continue
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else "Any"
        if default is None:
            out.append(Param(arg.arg, annotation, None, required=True))
            continue
        try:
            value = ast.literal_eval(default)
        except ValueError:
            raise LookupError(
                f"{cls}.{method} parameter {arg.arg!r} has a default that is not a literal "
                f"({ast.unparse(default)}); configs read it statically"
            ) from None
        out.append(Param(arg.arg, annotation, value))
    return tuple(out)
