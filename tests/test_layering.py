"""The house rules of docs/ARCHITECTURE.md, checked on the import statements of the source tree.

1. ``engine/`` imports nothing from ``algorithms/`` or ``generation/``.
2. ``algorithms/X`` never imports ``algorithms/Y``.
4. ``conversion/`` imports only ``models/``, ``parallel/`` and ``data/`` of the package.
5. No ``_private`` name of the package (or of the kernels) is imported from another file, nor
   reached as ``module._name`` through an imported module.

Imports inside function bodies count like top-level ones. Each rule is also shown to fire on a
planted violation, so a checker that silently sees nothing cannot pass.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source roots: (folder, the package name its files import as).
ROOTS = (("glm_megatron", "glm_megatron"), ("kernels/glm_kernels", "glm_kernels"))
CONVERSION_MAY_IMPORT = {"models", "parallel", "data", "conversion"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_files(repo: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file under the source roots."""
    found = {}
    for folder, package in ROOTS:
        base = repo / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]):
    """(line, imported module, imported name or None) for every import in the file, names
    resolved to absolute modules; ``from pkg import sub`` yields the submodule when it is one."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    yield node.lineno, sub, None
                else:
                    yield node.lineno, source, alias.name


def _first_party(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for _, package in ROOTS)


def _room(module: str) -> tuple[str, ...]:
    """('engine',), ('algorithms', 'sft'), ... : where a glm_megatron module lives."""
    parts = module.split(".")
    if parts[0] != "glm_megatron" or len(parts) < 2:
        return ()
    return tuple(parts[1:3]) if parts[1] == "algorithms" and len(parts) > 2 else (parts[1],)


def _private_attributes(path: Path, module: str, modules: dict[str, Path]):
    """``alias._name`` where ``alias`` is a first-party module this file imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _first_party(alias.name):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _is_private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            yield node.lineno, aliases[node.value.id], node.attr


def violations(repo: Path) -> list[str]:
    modules = module_files(repo)
    found = []
    for module, path in modules.items():
        where = path.relative_to(repo)
        room = _room(module)
        for line, target, name in imports_of(module, path, modules):
            at = f"{where}:{line}"
            if not _first_party(target):
                continue
            target_room = _room(target)
            if room == ("engine",) and target_room[:1] in (("algorithms",), ("generation",)):
                found.append(f"rule 1: {at}: engine/ imports {target}")
            if (room[:1] == ("algorithms",) and len(room) == 2 and len(target_room) == 2
                    and target_room[0] == "algorithms" and target_room != room):
                found.append(f"rule 2: {at}: algorithms/{room[1]} imports {target}")
            if (room == ("conversion",) and target.startswith("glm_megatron")
                    and target_room and target_room[0] not in CONVERSION_MAY_IMPORT):
                found.append(f"rule 4: {at}: conversion/ imports {target}")
            if target != module and (_is_private(target.rsplit(".", 1)[-1])
                                     or (name is not None and _is_private(name))):
                found.append(f"rule 5: {at}: private {target}{'.' + name if name else ''}")
        for line, target, attr in _private_attributes(path, module, modules):
            if target != module:
                found.append(f"rule 5: {where}:{line}: private {target}.{attr}")
    return found


def test_the_source_tree_keeps_the_rules():
    assert module_files(REPO), "no source files found: the checker would see nothing"
    assert violations(REPO) == []


PLANTED = {
    "glm_megatron/__init__.py": "",
    "glm_megatron/engine/__init__.py": "",
    "glm_megatron/engine/loop.py": "def f():\n    from ..generation import greedy\n",
    "glm_megatron/engine/config.py": "def _choice():\n    pass\n",
    "glm_megatron/generation/__init__.py": "",
    "glm_megatron/generation/greedy.py": "",
    "glm_megatron/algorithms/__init__.py": "",
    "glm_megatron/algorithms/sft/__init__.py": "",
    "glm_megatron/algorithms/sft/train.py": "from ...engine.config import _choice\n",
    "glm_megatron/algorithms/ppo/__init__.py": "",
    "glm_megatron/algorithms/ppo/models.py": "from ..sft.train import run_sft\n",
    "glm_megatron/conversion/__init__.py": "",
    "glm_megatron/conversion/export.py": "import glm_megatron.engine.config as c\nc._choice()\n",
    "kernels/glm_kernels/__init__.py": "from . import _tp\n",
    "kernels/glm_kernels/_tp.py": "",
}


@pytest.fixture
def planted(tmp_path):
    for rel, text in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_each_rule_fires_on_a_planted_violation(planted):
    found = "\n".join(violations(planted))
    assert "rule 1: glm_megatron/engine/loop.py:2: engine/ imports glm_megatron.generation.greedy" in found
    assert "rule 2: glm_megatron/algorithms/ppo/models.py:1: algorithms/ppo imports" in found
    assert "rule 4: glm_megatron/conversion/export.py:1: conversion/ imports glm_megatron.engine" in found
    assert ("rule 5: glm_megatron/algorithms/sft/train.py:1: private "
            "glm_megatron.engine.config._choice") in found
    assert "rule 5: glm_megatron/conversion/export.py:2: private glm_megatron.engine.config._choice" in found
    assert "rule 5: kernels/glm_kernels/__init__.py:1: private glm_kernels._tp" in found
    # A private name used in its own file is no violation.
    assert "engine/config.py" not in found


def test_fixing_the_planted_violations_clears_them(planted):
    (planted / "glm_megatron/engine/loop.py").write_text("from . import config\n")
    (planted / "glm_megatron/algorithms/sft/train.py").write_text("from ...engine import config\n")
    (planted / "glm_megatron/algorithms/ppo/models.py").write_text("from ...engine import loop\n")
    (planted / "glm_megatron/conversion/export.py").write_text("from .. import models\n")
    (planted / "kernels/glm_kernels/__init__.py").write_text("")
    assert violations(planted) == []


# Paths and modules named in code and docs: ``glm_megatron/engine/loop.py``, ``tools/x.py``,
# ``docs/ARCHITECTURE.md``, :mod:`glm_megatron.engine.loop`.
PATH_REF = re.compile(
    r"(?<![\w/.])((?:glm_megatron|kernels|tools|docs|tests|examples)/[\w/.-]*\w\.(?:py|md|yaml|sh))")
MODULE_REF = re.compile(r":(?:mod|func|class):`~?(glm_megatron(?:\.\w+)+)`")


def dangling_references(repo: Path) -> list[str]:
    modules = module_files(repo)
    # tests/ is left out: it names planted and missing files on purpose.
    files = [p for folder in ("glm_megatron", "kernels", "tools") for p in (repo / folder).rglob("*.py")]
    files += [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    found = []
    for path in files:
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for ref in PATH_REF.findall(line):
                if not (repo / ref).exists():
                    found.append(f"{path.relative_to(repo)}:{n}: {ref}")
            for ref in MODULE_REF.findall(line):
                parts = ref.split(".")
                # a module, or a name inside one
                if ref not in modules and ".".join(parts[:-1]) not in modules:
                    found.append(f"{path.relative_to(repo)}:{n}: {ref}")
    return found


def test_references_in_code_and_docs_point_at_files_that_exist():
    assert dangling_references(REPO) == []


def test_a_dangling_reference_is_found(planted):
    (planted / "tools").mkdir()
    (planted / "glm_megatron/engine/loop.py").write_text(
        '"""See glm_megatron/training/loop.py and :mod:`glm_megatron.training.sft`;\n'
        'glm_megatron/engine/config.py exists."""\n')
    found = "\n".join(dangling_references(planted))
    assert "glm_megatron/engine/loop.py:1: glm_megatron/training/loop.py" in found
    assert "glm_megatron.training.sft" in found
    assert "engine/config.py" not in found
