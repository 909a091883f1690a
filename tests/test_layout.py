"""The package's shape, as the spine wants it: imports among moeedge's modules point one
way (no cycles, counting function-level and type-checking imports too), no module imports another's
underscore names, and no file grows past about 400 lines of Python."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "moeedge"
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of a moeedge module in tree."""
    found = []
    package = name if name in known and (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() \
        else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("moeedge")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("moeedge"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found += [(m, []) for m in submodules]
            found.append((base, [n for n in names if f"{base}.{n}" not in known]))
    return [(m, n) for m, n in found if m in known]


def test_no_import_cycles():
    mods = modules()
    known = set(mods)
    graph = {name: {m for m, _ in imports(name, tree, known) if m != name} for name, tree in mods.items()}
    # A package's __init__ importing its own modules is not a cycle of theirs.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".") or m == "moeedge"}
        graph[name].discard("moeedge")
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_anothers_underscore_names():
    mods = modules()
    known = set(mods)
    bad = [f"{name} imports {n} from {m}" for name, tree in mods.items() for m, names in imports(name, tree, known)
           for n in names if n.startswith("_") and not n.startswith("__") and m != name and n != "_core"]
    assert not bad, bad


def test_no_python_file_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
