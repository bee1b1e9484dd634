"""The package's import graph, read from the source (function-level imports included): layers only point down.

From the top: the command lines (``cli``, ``launch``, ``analysis.command``), then the leaderboard and the
analysis, then the core (quick start, trainer, models, ...), with ``distributed`` and ``utils`` at the bottom.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "recbole_ilora"
ENTRY = {"recbole_ilora.cli", "recbole_ilora.launch"}
ABOVE_CORE = ("recbole_ilora.analysis", "recbole_ilora.leaderboard")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                targets.update(submodules or {node.module})  # `from package import module`: the module
        # A module's own packages are initialised before it runs: no edge to them.
        graph[name] = {target for target in targets
                       if target in modules and target != name and not name.startswith(target + ".")}
    return graph


def within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_no_import_runs_up_a_layer():
    graph = import_graph()
    upward = []
    for source, targets in graph.items():
        for target in targets:
            core = not within(source, ENTRY | set(ABOVE_CORE)) and source != "recbole_ilora.__main__"
            if (core and within(target, ENTRY | set(ABOVE_CORE))
                    or within(source, ABOVE_CORE) and within(target, ENTRY)
                    or within(source, ["recbole_ilora.distributed"]) and not within(target, ["recbole_ilora.distributed"])
                    or source == "recbole_ilora.utils"):
                upward.append(f"{source} -> {target}")
    assert not sorted(upward)


def test_no_import_circle():
    graph = import_graph()
    for start in graph:
        seen, stack = set(), list(graph[start])
        while stack:
            node = stack.pop()
            assert node != start, f"{start} imports itself through {sorted(seen)}"
            if node not in seen:
                seen.add(node)
                stack.extend(graph[node])
