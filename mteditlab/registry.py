"""Name → class registries that fill themselves: a backend registers its class with a decorator in
its own module, and the registry imports every module of its package the first time it is read.

    EDITORS = Registry("editor", "mteditlab.editors")

    @EDITORS.register("mini")
    class MiniEditor(FlowPolicy): ...

    EDITORS["mini"]          # the class; "mini" in EDITORS, list(EDITORS): the names, as argparse choices

Modules of a registry's package therefore keep their heavy imports (model libraries, pipelines)
inside the functions that need them: looking one backend up imports all of them. A process that must
not import them at all (the app's web server parsing its flags) reads the names from the sources
with :func:`registered_names`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from collections.abc import Iterator, Mapping


class Registry(Mapping[str, type]):
    """Classes by name, registered with :meth:`register`; reading it imports the package's modules once.
    An unknown name raises ``missing`` (the package's own error type) naming the known ones."""

    def __init__(self, kind: str, package: str, missing: type[Exception] = KeyError):
        self.kind, self.package, self.missing = kind, package, missing
        self._classes: dict[str, type] = {}
        self._discovered = False

    def register(self, name: str):
        """Class decorator: register the class under ``name`` (and set its ``name`` attribute)."""
        def decorate(cls: type) -> type:
            if self._classes.get(name, cls) is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._classes[name].__name__}, {cls.__name__})")
            cls.name = name
            self._classes[name] = cls
            return cls
        return decorate

    def _discover(self) -> dict[str, type]:
        if not self._discovered:
            self._discovered = True
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
        return self._classes

    def __getitem__(self, name: str) -> type:
        classes = self._discover()
        if name not in classes:
            raise self.missing(f"unknown {self.kind} {name!r}; choose one of {', '.join(classes)}")
        return classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._discover()

    def __iter__(self) -> Iterator[str]:
        return iter(self._discover())

    def __len__(self) -> int:
        return len(self._discover())

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self)})"


def registered_names(package: str, decorator: str) -> tuple[str, ...]:
    """The names a package's modules register with ``@decorator("NAME")`` on a class, read from their
    source without importing them (in file order)."""
    names = []
    for path in sorted(Path(importlib.util.find_spec(package).submodule_search_locations[0]).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                names += [d.args[0].value for d in node.decorator_list
                          if isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == decorator
                          and d.args and isinstance(d.args[0], ast.Constant)]
    return tuple(names)


def mapping(value_type):
    """``NAME=VALUE,...`` → ``{NAME: value_type(VALUE)}``: the argparse type of the flags that name
    registered things with a value each (``--reward judge=1.0``, ``--reward-paths judge=DIR``)."""
    def parse(text: str) -> dict:
        return {k: value_type(v) for k, v in (p.split("=", 1) for p in text.split(",") if p)}
    return parse
