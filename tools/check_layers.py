"""Fail if a pure-core module imports a forbidden package, directly or transitively.

The pure core (selection, planning, rule rendering) must stay testable without a
cluster, a kernel or an event loop, so it may not reach kopf, kubernetes or
pyroute2 through any chain of project imports. Layers are declared in
pyproject.toml under [tool.ambient-cni.layers]; a core entry names a module or
a package (the package and everything under it).

Usage: python tools/check_layers.py [--pyproject pyproject.toml]
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Violation:
    chain: tuple[str, ...]  # core module, ..., forbidden import

    def __str__(self) -> str:
        return " -> ".join(self.chain)


def module_files(source_root: Path, package: str) -> dict[str, Path]:
    """Map dotted module names to their files for one package under source_root."""
    modules: dict[str, Path] = {}
    for path in sorted((source_root / package).rglob("*.py")):
        parts = list(path.relative_to(source_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name a module imports, anywhere in its body, made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node.module, node.level)
            names.add(base)
            # `from pkg import mod` imports pkg.mod when it is a module.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _resolve_from(module: str, is_package: bool, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join([*anchor, target] if target else anchor)


def _covers(entry: str, module: str) -> bool:
    return module == entry or module.startswith(entry + ".")


def find_violations(
    source_root: Path, package: str, core: list[str], forbidden: list[str]
) -> list[Violation]:
    files = module_files(source_root, package)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str] = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            # Importing a.b.c executes a, a.b and a.b.c: follow every project prefix.
            edges.update(
                ".".join(parts[:i])
                for i in range(1, len(parts) + 1)
                if ".".join(parts[:i]) in files
            )
            if parts[0] in forbidden:
                edges.add(parts[0])
        graph[module] = edges

    violations: list[Violation] = []
    roots = [m for m in files if any(_covers(entry, m) for entry in core)]
    for root in roots:
        # Breadth-first, so each reported chain is a shortest one.
        parent: dict[str, str | None] = {root: None}
        frontier = [root]
        while frontier:
            next_frontier: list[str] = []
            for module in frontier:
                for target in sorted(graph.get(module, ())):
                    if target in parent:
                        continue
                    parent[target] = module
                    if target.split(".")[0] in forbidden:
                        violations.append(Violation(_chain(parent, target)))
                    else:
                        next_frontier.append(target)
            frontier = next_frontier
    return violations


def _chain(parent: dict[str, str | None], last: str) -> tuple[str, ...]:
    chain = [last]
    while (step := parent[chain[-1]]) is not None:
        chain.append(step)
    return tuple(reversed(chain))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    config = tomllib.loads(args.pyproject.read_text())
    layers = config["tool"]["ambient-cni"]["layers"]
    root = args.pyproject.parent
    source_root = root / config["tool"]["setuptools"]["packages"]["find"]["where"][0]
    files = module_files(source_root, "ambient_cni")
    unknown = [e for e in layers["core"] if not any(_covers(e, m) for m in files)]
    if unknown:
        print(f"check_layers: core entries match no module: {', '.join(unknown)}", file=sys.stderr)
        return 2
    violations = find_violations(source_root, "ambient_cni", layers["core"], layers["forbidden"])
    for violation in violations:
        print(f"check_layers: pure core imports a forbidden package: {violation}", file=sys.stderr)
    if not violations:
        print(
            f"check_layers: {len(layers['core'])} core entries import none of {layers['forbidden']}"
        )
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
