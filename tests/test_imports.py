"""The package's import graph: no cycles, and no module reads another module's private names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reft"


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (ast.parse(path.read_text()), path.name == "__init__.py")
    return found


def _imports(name: str, tree: ast.Module, is_package: bool, known: set[str]):
    """`(module imported, names taken from it)` for every import of a reft module, at any depth."""
    package = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("reft"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, []) if sub in known else (target, [alias.name])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("reft"):
                    yield alias.name, []


def _graph():
    modules = _modules()
    known = set(modules)
    graph, private = {}, []
    for name, (tree, is_package) in modules.items():
        edges = set()
        for target, names in _imports(name, tree, is_package, known):
            if target != name:
                edges.add(target)
            private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__") and target != name]
        graph[name] = edges
    return graph, private


def test_no_import_cycle_inside_the_package():
    graph, _ = _graph()
    cycles = []

    def visit(node, stack, done):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            if nxt == "reft" or node == "reft":  # the package's __init__ re-exports; it imports everything
                continue
            visit(nxt, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        visit(node, [], done)
    assert not cycles, cycles


def test_no_module_reads_another_modules_private_names():
    _, private = _graph()
    assert not private, private
