"""No module imports a layer above its own.

Layers, bottom to top; a module may import its own layer and any layer below it:

    0  core      ``mteditlab.*``: the world, flow math, editors, rewards, the rollout loop,
                 evaluation (``mteditlab.bench``), simulated editors and annotators, text encoder,
                 session data
    1  labeling  ``labeling.*``: the DuckDB store, queue, ratings, agreement, exports, simulated labels
    2  training  ``training.*``: pretraining, the judge, the reward model, the RL trainer
    3  app       ``ui.*`` and ``app.py``: the Gradio UI
    4  tools     ``tests``, ``bench``, ``docs``, ``examples``: scripts and checks that may import any
                 layer and that no layered module imports

labeling and training are the middle floor, and the arrow between them runs one way: training reads
human labels (``training.reward_model`` fits on the store's judgments, ``training.session_sources``
reads sessions from a label store), and labeling never imports training. So training ranks just
above labeling: training importing labeling is allowed, labeling importing training fails.

Every import counts: at module level, inside functions and classes, under ``if TYPE_CHECKING:``,
relative imports (resolved against the importing module), and ``importlib.import_module`` /
``__import__`` called with a literal name. Imports by a computed name (``labeling.cli`` loads its
``EXTENSIONS`` list of module names) are not seen.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mteditlab", "labeling", "training", "ui")
SCRIPTS = ("app.py",)
LAYERS = ("core", "labeling", "training", "app", "tools")
TOOLS = ("tests", "bench", "docs", "examples")


def layer_of(module: str) -> int | None:
    """Rank of a project module in LAYERS; None for modules outside the project (stdlib, third party)."""
    top = module.split(".")[0]
    if top in ("ui", "app"):
        return LAYERS.index("app")
    if top == "mteditlab":
        return LAYERS.index("core")
    if top in ("labeling", "training"):
        return LAYERS.index(top)
    if top in TOOLS:
        return LAYERS.index("tools")
    return None


@dataclass(frozen=True)
class Import:
    module: str  # the imported module as written, relative imports resolved
    line: int


def imports_of(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import in ``source`` (the text of ``module``), wherever it stands in the file."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # ``from pkg import sub`` may name a submodule (``from mteditlab import world``): judge each
            # name as pkg.name, which has the layer of pkg unless it is a subpackage of another layer
            found += [Import(name if alias.name == "*" else f"{name}.{alias.name}", node.lineno)
                      for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str) and not first.value.startswith("."):
                found.append(Import(first.value, node.lineno))
    return found


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every layered module (the three packages and app.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    for script in SCRIPTS:
        modules[script[:-3]] = ROOT / script
    return modules


def upward_imports() -> dict[tuple[str, str], str]:
    """(importer, imported) -> "file:line, layer -> layer" for each import of a higher layer."""
    found = {}
    for module, path in project_modules().items():
        own = layer_of(module)
        for imp in imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            target = layer_of(imp.module)
            if target is not None and target > own:
                found.setdefault((module, imp.module),
                                 f"{path.relative_to(ROOT)}:{imp.line}, {LAYERS[own]} -> {LAYERS[target]}")
    return found


def test_no_module_imports_a_higher_layer():
    new = upward_imports()
    assert not new, ("modules import a higher layer (see tests/test_layers.py for the layers; move the "
                     "code down or the import up):\n" + "\n".join(
                         f"  {importer} imports {imported}  ({where})"
                         for (importer, imported), where in sorted(new.items())))


def test_every_layer_is_scanned():
    modules = project_modules()
    assert {"mteditlab", "mteditlab.world", "ui", "labeling", "training", "app"} <= modules.keys()
    assert {layer_of(m) for m in modules} == {0, 1, 2, 3}


def test_scanner_sees_imports_in_functions_relative_and_dynamic():
    source = '''
import os
from . import store
from ..world import render
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from training.grpo import GRPOConfig

class Panel:
    def draw(self):
        import ui.arena as arena
        import ui

def load():
    import importlib
    return importlib.import_module("bench.queue_selection"), __import__("tests")
'''
    found = {(i.module, i.line) for i in imports_of(source, "mteditlab.rewards.base", is_package=False)}
    assert {("os", 2), ("mteditlab.rewards.store", 3), ("mteditlab.world.render", 4),
            ("training.grpo.GRPOConfig", 7), ("ui.arena", 11), ("ui", 12),
            ("bench.queue_selection", 16), ("tests", 16)} <= found
    assert {i.module for i in imports_of("from . import x", "labeling", is_package=True)} == {"labeling.x"}
    ranks = [layer_of(m) for m in ("os", "mteditlab.world", "labeling.store", "training.grpo",
                                   "ui.arena", "app", "bench.queue_selection")]
    assert ranks == [None, 0, 1, 2, 3, 3, 4]
