"""The folders are the pipeline and imports only run down it (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import advguard

PACKAGE = Path(advguard.__file__).parent

# Each top-level module or folder of the package, by its place in the pipeline: a module may
# import from its own level or the levels above it (lower numbers), never from below.
LEVELS = {
    "errors": 0, "options": 0, "io": 0, "batching": 0, "distributed": 0, "__init__": 0,
    "data": 1, "models": 2, "attacks": 3, "training": 4, "ensemble": 4, "strengths": 5,
    "evaluation": 6, "detection": 7, "reports": 8, "reproduce": 9, "cli": 10, "serve": 10,
}


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The advguard top-level parts that ``path`` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "advguard" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "advguard" and isinstance(node, ast.ImportFrom):
                found.update(a.name for a in node.names)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_level():
    assert {_part(p) for p in MODULES} <= set(LEVELS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_pipeline(path):
    here = LEVELS[_part(path)]
    upward = {name for name in _imports(path) if LEVELS.get(name, 0) > here}
    assert not upward, f"{path.relative_to(PACKAGE)} imports from below it: {sorted(upward)}"


FUNCTION_LINES = 80  # a function a reader can follow in one screen


def test_no_function_is_over_80_lines():
    """Small rooms: no function or method of the package is longer than a screen (files may
    grow; what they hold stays in pieces a reader can follow)."""
    long = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
    assert not long, long


def test_a_detector_is_one_file_and_one_registry_line():
    """Nothing outside a registered detector's own file, the registry and the detection
    package's exports names its class: commands, the service and the experiments reach every
    detector through the registry (docs/ARCHITECTURE.md, "Adding a detector")."""
    import inspect

    from advguard.detection import DETECTORS

    allowed = {PACKAGE / "detection" / "registry.py", PACKAGE / "detection" / "__init__.py"}
    named = {}
    for cls in DETECTORS.values():
        own = Path(inspect.getfile(cls))
        for path in MODULES:
            if path == own or path in allowed:
                continue
            if path.parent == own.parent and any(  # a subclass registered in its own right
                    Path(inspect.getfile(c)) == path for c in DETECTORS.values()
                    if issubclass(c, cls) and c is not cls):
                continue
            found = {n.id for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(n, ast.Name)} | {
                n.attr for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(n, ast.Attribute)}
            if cls.__name__ in found:
                named.setdefault(cls.__name__, []).append(str(path.relative_to(PACKAGE)))
    assert not named, named


def test_a_model_source_is_one_file_and_one_import_line():
    """Each registered model source lives in its own module, which registers itself and which
    only ``models/__init__.py`` imports (docs/ARCHITECTURE.md, "Adding a model source")."""
    import inspect

    from advguard.models.builders import SOURCES

    assert {"torchvision", "timm", "hf"} <= set(SOURCES)
    for prefix, source in SOURCES.items():
        own = Path(inspect.getfile(source.build))
        module = "advguard." + ".".join(own.relative_to(PACKAGE).with_suffix("").parts)
        name = module.rsplit(".", 1)[1]
        importers = {p.relative_to(PACKAGE).as_posix() for p in MODULES if p != own and (
            module in _modules_imported(p) or
            ("advguard.models" in _modules_imported(p) and name in _names_imported(p)))}
        assert importers == {"models/__init__.py"}, (prefix, importers)


def test_an_attack_is_its_file_and_one_registry_entry():
    """A registered attack reaches every consumer from its entry alone: evaluate's choices
    (white-box and transferred), the audit's independent attacks (docs/ARCHITECTURE.md,
    "Adding an attack")."""
    from advguard.attacks import ATTACKS
    from advguard.attacks.registry import EVALUATION, INDEPENDENT, attack_label, build_attack
    from advguard.evaluation.audit import independent_attacks
    from advguard.evaluation.robustness import threat_names

    for name, entry in ATTACKS.items():
        for norm in entry.classes:
            attack = build_attack(name, norm)
            assert type(attack) in entry.classes.values()
            if EVALUATION in entry.roles:
                assert {f"white-box-{name}", f"transfer-{name}"} <= set(threat_names())
            if INDEPENDENT in entry.roles:
                assert attack_label(name, attack, norm) in independent_attacks(norm=norm)


def _modules_imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def _names_imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
