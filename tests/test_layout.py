"""The layout rules of docs/architecture.md, checked on the source: small modules, layers that
import only downwards, no import cycle, and no method named outside methods/."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "hybridtune"
MODULES = {
    ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")
}
# layer -> the layers it may import at module level (cli may import everything)
ALLOWED = {
    "kernels": {"kernels"},
    "core": {"core", "methods", "kernels"},
    "methods": {"methods", "core", "kernels"},
    "training": {"training", "core", "methods", "kernels"},
    "interop": {"interop", "core", "methods", "kernels"},
    "serving": {"serving", "core", "methods", "training", "kernels"},
    "ui": {"ui", "core", "methods", "training", "kernels"},
}


def top_level_imports(name: str, path: Path) -> set[str]:
    """The hybridtune modules ``name`` imports when it is imported (not inside functions)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES}


GRAPH = {name: top_level_imports(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= 400, f"{MODULES[name]} has {lines} lines; split it (docs/architecture.md)"


def test_layers_import_only_downwards():
    wrong = []
    for name, imports in GRAPH.items():
        layer = name.split(".")[1] if name.count(".") >= 1 else None
        if layer not in ALLOWED:
            continue
        for target in imports:
            other = target.split(".")[1] if target.count(".") >= 1 else "hybridtune"
            if other not in ALLOWED[layer] and target != "hybridtune":
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in GRAPH[name]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if not state.get(target):
                visit(target, [*path, target])
        state[name] = 2

    for name in GRAPH:
        if not state.get(name):
            visit(name, [name])


def test_no_method_is_named_outside_methods():
    """Capabilities are asked of the config (docs/architecture.md), never a method's class or type."""
    from hybridtune.methods import METHODS

    classes = {c.__name__ for c in METHODS.values()}
    classes |= {f"{name.removesuffix('Config')}Branch" for name in classes} | {"LowRankConfig"}
    kinds = "|".join(sorted(METHODS))
    pattern = re.compile(
        rf"\b({'|'.join(sorted(classes))})\b|\.type [!=]= [\"']({kinds})[\"']"  # a class, a type comparison,
        rf"|[\"']type[\"']\]? *[:=] *[\"']({kinds})[\"']|[\"']methods\.({kinds})\."  # an entry built by its type
    )
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("hybridtune.methods") or name == "hybridtune":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and not code.strip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_only_the_method_api_is_imported_outside_methods():
    """Outside methods/, code reaches a method through the registry and methods/base.py, never by
    importing the method's own module (or a helper module of some methods)."""
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("hybridtune.methods"):
            continue
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                if target.startswith("hybridtune.methods.") and target != "hybridtune.methods.base":
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: imports {target}")
    assert not offenders, "\n".join(offenders)
