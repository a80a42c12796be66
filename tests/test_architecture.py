"""The import rules of docs/architecture.md, checked on every import in src/cmpq
(function-level imports included), and no import circles between modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "cmpq"
RULES_DOC = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}


def imports_of(module: str) -> set[str]:
    """Every module name ``module`` imports (and, for ``from x import y``, ``x.y``),
    wherever the import statement is, relative imports resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def imported_modules(module: str) -> set[str]:
    """Every cmpq module ``module`` imports."""
    return {name for name in imports_of(module) if name in MODULES}


def part_of(module: str) -> str:
    """``cmpq.format.spec`` -> ``format``; ``cmpq.cli`` -> ``cli``; ``cmpq`` -> ``cmpq``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cmpq"


def documented_rules() -> dict[str, set[str]]:
    """The "What may import what" table of docs/architecture.md."""
    rules = {}
    for line in RULES_DOC.read_text().splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| (.*) \|", line.strip())
        if match:
            rules[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return rules


def test_the_rules_cover_every_part():
    rules = documented_rules()
    assert {part_of(module) for module in MODULES} == set(rules)


def test_every_import_follows_the_documented_rules():
    rules = documented_rules()
    broken = [
        f"{module} imports {target}"
        for module in sorted(MODULES)
        for target in sorted(imported_modules(module))
        if part_of(target) != part_of(module) and part_of(target) not in rules[part_of(module)]
    ]
    assert not broken, "\n".join(broken)


def test_the_format_never_imports_transformers():
    """format is what loaders and inspect share: it never pulls in model code."""
    for module in MODULES:
        if part_of(module) == "format":
            assert not any(name.startswith("transformers") for name in imports_of(module)), module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a self-loop."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles_between_modules():
    graph = {module: imported_modules(module) for module in MODULES}
    assert _cycles(graph) == []


def test_no_import_circles_between_parts():
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = {part_of(t) for t in imported_modules(module)}
        graph.setdefault(part_of(module), set()).update(targets - {part_of(module)})
    assert _cycles(graph) == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself can fail: a circle hidden in a function is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b"]]
    assert "cmpq.models.sources" in imported_modules("cmpq.runtime.checkpoint")
    assert "cmpq.eval.generation" in imported_modules("cmpq.cli")  # imported inside a function
