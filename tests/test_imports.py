"""The import rule: every module of ``surgery`` and ``exporters`` imports on its own in a fresh
interpreter, and the floors a prune or ``surgery --help`` runs on do not import torch or
transformers at start-up (they may import them inside a function, when asked to cast or measure).

The layering itself (which module may import which) is the import-linter contract in pyproject.toml
(``lint-imports``); import-linter also sees imports inside functions, so it cannot tell "on demand"
from "at start-up": this file does.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib

import pytest

import surgery
from tests.helpers import ROOT

PACKAGES = ("surgery", "exporters")
HEAVY = ("torch", "transformers")


def module_names() -> list[str]:
    """Every module file under the packages, as a dotted name (a package by its ``__init__``)."""
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = module_names()

# Floors 1-3 (plan and errors, sources, the writer), the API and the CLI: what a prune, an inspect,
# a dry run and ``--help`` import. Measurement (validate, view, ...) and ONNX may import torch.
LIGHT = [
    "surgery", "exporters",
    "surgery.version", "surgery.plan", "surgery.errors", "surgery.checkpoint", "surgery.redact", "surgery.compat",
    "surgery.modeling_wide",  # the package only: the modelling code shipped into checkpoints imports both
    "surgery.gguf_header", "surgery.source", "surgery.architecture",
    "surgery.engine", "surgery.widen", "exporters.safetensors", "exporters.staging",
    "surgery.api", "surgery.cli",
]


def fresh_import(module: str) -> subprocess.CompletedProcess[str]:
    """Import MODULE alone in a new interpreter; it prints which of HEAVY it loaded."""
    code = f"import sys\nimport {module}\nprint(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_walk_finds_every_floor() -> None:
    assert {"surgery", "surgery.cli", "surgery.plan", "exporters", "exporters.staging",
            "surgery.modeling_wide.modeling_surgery_parallel"} <= set(MODULES)
    assert set(LIGHT) <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_on_its_own(module: str) -> None:
    done = fresh_import(module)
    assert done.returncode == 0, f"python -c 'import {module}' failed:\n{done.stderr}"


@pytest.mark.parametrize("module", LIGHT)
def test_light_floor_imports_neither_torch_nor_transformers(module: str) -> None:
    done = fresh_import(module)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [], f"importing {module} imports {done.stdout.strip()}"


def test_importing_the_package_imports_none_of_its_modules() -> None:
    # Only surgery.version: the version string, a module that imports nothing.
    code = ("import sys, surgery\nprint(sorted(m for m in sys.modules if m.startswith(('surgery.', 'exporters'))))\n"
            "print(surgery.__version__, sys.modules['surgery.version'].__version__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.stdout.splitlines() == ["['surgery.version']", f"{version} {version}"]


def test_public_names_table_matches_all_and_the_typed_imports() -> None:
    # The TYPE_CHECKING imports (what mypy and IDEs read) name the same module as the lazy table.
    tree = ast.parse((ROOT / "surgery" / "__init__.py").read_text())
    typed = {
        alias.name: node.module
        for block in tree.body
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == surgery._EXPORTS
    assert sorted(surgery._EXPORTS) == sorted(surgery.__all__)
    assert set(surgery.__all__) <= set(dir(surgery))
    for name in surgery.__all__:
        value = getattr(surgery, name)
        assert value.__module__ == surgery._EXPORTS[name], name
        assert getattr(sys.modules[surgery._EXPORTS[name]], name) is value
    from surgery import prune

    assert prune is surgery.prune
    with pytest.raises(AttributeError, match="no_such_name"):
        surgery.no_such_name  # noqa: B018


def test_functions_keep_their_names_over_same_named_modules() -> None:
    # surgery.validate, .analyze and .sweep are the functions, whichever is imported first; the
    # modules stay in sys.modules. Other submodules are reached as attributes, as before.
    code = (
        "import sys\nimport surgery.validate, surgery.analyze\nimport surgery\nfrom surgery.sweep import sweep\n"
        "from surgery import analyze\n"
        "print([type(f).__name__ + ' ' + f.__name__ for f in (surgery.validate, analyze, surgery.sweep)])\n"
        "print(type(sys.modules['surgery.validate']).__name__, surgery.plan.parse_ranges('2-3'))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['function validate', 'function analyze', 'function sweep']", "module [2, 3]"]
