"""The shape of the package's code: the longest functions, closures, nonlocal names, imports inside functions and
import cycles between job's modules (imports inside functions count), from the source alone (ast; nothing is imported).

    .venv/bin/python benchmarks/code_shape.py [--top 6] [PACKAGE_DIR]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node, enclosing function or None) for every function, nested ones included."""
    def walk(node, scope, outer):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{scope}.{child.name}" if scope else child.name
                yield name, child, outer
                yield from walk(child, name, child)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{scope}.{child.name}" if scope else child.name, outer)
            else:
                yield from walk(child, scope, outer)
    yield from walk(tree, prefix, None)


def local_imports(tree: ast.AST) -> list[int]:
    """The lines of the import statements inside functions."""
    lines = set()
    for _, node, _ in functions(tree):
        lines.update(c.lineno for c in ast.walk(node) if isinstance(c, (ast.Import, ast.ImportFrom)))
    return sorted(lines)


def job_imports(tree: ast.AST, package: str) -> set[str]:
    """The package's modules this module imports, at its top level or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            if node.module == package:
                names.update(alias.name for alias in node.names)
            else:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
    return names


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    found = set()

    def visit(path):
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0] and len(path) > 1:
                start = path.index(min(path))
                found.add(tuple(path[start:] + path[:start]))
            elif nxt not in path and nxt > path[0]:
                visit(path + [nxt])

    for module in sorted(graph):
        visit([module])
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "job")
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()
    lengths, closures, nonlocal_names, imports_inside, graph = [], [], set(), [], {}
    for path in sorted(args.package.glob("*.py")):
        tree = ast.parse(path.read_text())
        module = path.stem
        graph[module] = job_imports(tree, args.package.name) - {module}
        for name, node, outer in functions(tree):
            lengths.append((node.end_lineno - node.lineno + 1, f"{module}.{name}"))
            if outer is not None:
                closures.append(f"{module}.{name}")
        for child in ast.walk(tree):
            if isinstance(child, ast.Nonlocal):
                nonlocal_names.update(f"{module}:{n}" for n in child.names)
        imports_inside += [f"{module}:{line}" for line in local_imports(tree)]
    print(f"longest functions in {args.package.name}/ (lines):")
    for count, name in sorted(lengths, reverse=True)[:args.top]:
        print(f"  {count:4d}  {name}")
    print(f"closures (functions defined inside functions): {len(closures)}")
    print(f"names rewritten through nonlocal: {len(nonlocal_names)}")
    print(f"imports inside functions: {len(imports_inside)}")
    found = cycles(graph)
    print(f"import cycles: {len(found)}" + "".join(f"\n  {' -> '.join(c + (c[0],))}" for c in found))


if __name__ == "__main__":
    main()
