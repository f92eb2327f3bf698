"""The packages' import graph has no cycle and no module is longer than 600 lines.

Every ``import``/``from`` statement counts, at module level and inside functions (a function-level import is a
cycle deferred to run time, not a cycle removed), except those under ``if TYPE_CHECKING:``, which never run.
Relative imports are resolved; ``from .pkg import name`` where ``pkg.name`` is a module counts as importing that
module (and not ``pkg/__init__.py``: importing a submodule of a package being initialised is well defined). A
parent package is not an implicit edge of its submodules, for the same reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"eagle_runtime": ROOT / "python" / "eagle_runtime", "eagle_kernels": ROOT / "eagle_kernels"}
# Compiled modules (no Python source, import nothing of ours), known whether or not they are built here, so that
# ``from . import _C`` is an edge to ``_C`` and not to the package.
EXTENSIONS = {"eagle_kernels._C"}
MAX_LINES = 600


def package_modules(packages: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is_package)}`` for every ``.py`` file under each package's root."""
    mods = {}
    for name, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join(parts)] = (path, is_pkg)
    return mods


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _type_checking_block(node):
            children = node.orelse
        stack.extend(children)


def imports_of(module: str, path: Path, is_pkg: bool, known) -> set[str]:
    """The modules of ``known`` that ``module`` (source at ``path``) imports."""
    out: set[str] = set()
    here = module.split(".") if is_pkg else module.split(".")[:-1]  # the package relative imports start from
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                for n in range(len(parts), 0, -1):  # ``import a.b.c``: the deepest module of ours it names
                    if ".".join(parts[:n]) in known:
                        out.add(".".join(parts[:n]))
                        break
            continue
        if node.level:
            if node.level - 1 > len(here):
                raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
            base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        else:
            base = node.module.split(".")
        base_name = ".".join(base)
        for alias in node.names:
            sub = f"{base_name}.{alias.name}"
            if sub in known:  # ``from .pkg import mod``: the submodule
                out.add(sub)
            elif base_name in known:
                out.add(base_name)
    out.discard(module)  # ``from . import x`` inside x's own package __init__ resolving to itself is no cycle
    return out


def import_graph(packages: dict[str, Path] = PACKAGES, extensions=frozenset()) -> dict[str, set[str]]:
    """``{module: the modules of ours it imports}``, ``extensions`` included as modules that import nothing."""
    mods = package_modules(packages)
    graph = {m: imports_of(m, path, is_pkg, mods.keys() | extensions) for m, (path, is_pkg) in mods.items()}
    return graph | {e: set() for e in extensions}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    sccs.append(sorted(comp))
    cycles: list[list[str]] = []
    for comp in sccs:  # a shortest cycle through each member, each cycle once (starting at its first module)
        for m in comp:
            c = _cycle_in(graph, set(comp), m)[:-1]
            i = c.index(min(c))
            c = c[i:] + c[:i] + [min(c)]
            if c not in cycles:
                cycles.append(c)
    return cycles


def _cycle_in(graph: dict[str, set[str]], comp: set[str], first: str) -> list[str]:
    """A shortest cycle through ``first`` inside its strongly connected component ``comp`` (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [first]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for m in sorted(graph.get(node, ())):
                if m == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(parent[path[-1]])
                    return [first, *reversed(path[:-1]), first]
                if m in comp and m not in parent:
                    parent[m] = node
                    nxt_frontier.append(m)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {first} in {sorted(comp)}")


# ----------------------------------------------------------------------------------------------------------------
# The finder itself, on graphs and packages small enough to check by eye
# ----------------------------------------------------------------------------------------------------------------
def test_find_cycles_on_small_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    many = find_cycles({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"x", "y"}, "q": {"a", "x"}})
    assert sorted(many) == [["a", "b", "a"], ["x", "y", "z", "x"], ["y", "z", "y"]], many


def test_imports_are_resolved_at_every_depth(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from pkg import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import b\nimport pkg.a.os\nfrom ..sub.c import x\n")
    (pkg / "d.py").write_text("from . import _ext, b\nfrom pkg import f\n")
    graph = import_graph({"pkg": pkg}, extensions={"pkg._ext"})
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.sub": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a", "pkg.b"}, "pkg.d": {"pkg", "pkg._ext", "pkg.b"}, "pkg._ext": set()}, graph
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]  # the function-level import closes it


# ----------------------------------------------------------------------------------------------------------------
# The packages
# ----------------------------------------------------------------------------------------------------------------
def test_packages_have_no_import_cycle():
    graph = import_graph(extensions=EXTENSIONS)
    assert graph["eagle_runtime.cli"], "the graph is empty: the parser found no imports"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_600_lines():
    long = {m: n for m, (path, _) in package_modules(PACKAGES).items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_trainers_do_not_import_the_runtime_command_line():
    graph = import_graph(extensions=EXTENSIONS)
    reach, todo = set(), ["eagle_runtime.train.command", "eagle_runtime.train.target", "eagle_runtime.train.distill"]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph[m])
    assert "eagle_runtime.cli" not in reach
