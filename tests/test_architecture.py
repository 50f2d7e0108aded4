"""The package's shape: no import cycles among loraleak's modules, and a kernel that imports no stage.

The imports are read from the source with `ast`, module-level and in-function alike (an import
inside a function is still a dependency: it only moves the failure to run time), so the check costs
no import of torch and names the modules of any cycle it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import loraleak

PACKAGE = Path(loraleak.__file__).parent
# The shared kernel (see ARCHITECTURE.md): what the stages build on, so it imports none of them.
KERNEL = ("loraleak.lora", "loraleak.cluster", "loraleak.tracking", "loraleak.config", "loraleak.errors",
          "loraleak.locking", "loraleak.keys", "loraleak.command", "loraleak.leftovers")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the loraleak modules it imports (`from . import x` counts x when x is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_loraleak_modules():
    graph = import_graph()
    assert len(graph) > 50 and "loraleak.pipeline.run" in graph  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles (module-level or in-function):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_kernel_imports_no_stage():
    graph = import_graph()
    kernel = {m for m in graph if any(m == k or m.startswith(f"{k}.") for k in KERNEL)}
    assert {"loraleak.lora.io", "loraleak.lora.batched", "loraleak.lora.formats", "loraleak.cluster"} <= kernel
    outside = {m: sorted(t for t in graph[m] if t not in kernel) for m in sorted(kernel)}
    assert not {m: t for m, t in outside.items() if t}, "kernel modules importing stage modules"
