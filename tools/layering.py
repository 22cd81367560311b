"""The package's import graph and its layering rules, read from the source with ``ast``.

Every ``import`` counts, including the lazy ones inside functions. Run it from the
repository root to print the figures (modules, import arrows, loops, private imports,
largest module) and every rule broken::

    python tools/layering.py           # exit status 1 when a rule is broken

``tests/test_layering.py`` asserts that no rule is broken.

Rules:
* no import loop between modules;
* quantization (``lora_course.quant``) never imports adapter methods, teaching code
  (exercises, notebook tools, misconceptions) or experiments;
* library modules never import ``lora_course.experiments``;
* no module imports a private name (leading underscore) of another module;
* no module is longer than ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lora_course"
MAX_LINES = 600
# What quantization may import: formats and frozen quantized layers only, and the helpers
# below every layer (argument checks, records).
QUANT_MAY_IMPORT = ("lora_course.quant", "lora_course.checks", "lora_course.records", "lora_course.compare")
LIBRARY_EXEMPT = ("lora_course.experiments",)  # experiments may import experiments


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> modules it imports
    private: list[tuple[str, str, str]] = field(default_factory=list)  # (importer, module, name)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute module name of a (possibly relative) import inside ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def build(root: Path = ROOT) -> Graph:
    graph = Graph()
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = module_name(path, root)
        graph.modules[name] = path
        graph.lines[name] = len(path.read_text(encoding="utf-8").splitlines())
    known = set(graph.modules)

    def owner(mod: str) -> str | None:
        """The known module ``mod`` names (or the closest enclosing package)."""
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE) and owner(alias.name):
                        targets.add(owner(alias.name))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                if not base.startswith(PACKAGE):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:  # "from . import lora": the submodule itself
                        targets.add(sub)
                        continue
                    mod = owner(base)
                    if mod is None:
                        continue
                    targets.add(mod)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and mod != name:
                        graph.private.append((name, mod, alias.name))
        targets.discard(name)
        graph.edges[name] = targets
    return graph


def _is_package_init(graph: Graph, a: str, b: str) -> bool:
    """A package's ``__init__`` importing its own submodules (and they importing siblings
    through it) is how re-exports work; those arrows are not layering loops."""
    return b.startswith(a + ".") or a.startswith(b + ".") and graph.modules[b].name == "__init__.py"


def loops(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring the
    arrows from a package to its own submodules (re-exports)."""
    edges = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in graph.edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def _importers(graph: Graph, a: str, b: str) -> bool:
    return b in graph.edges.get(a, ())


def violations(graph: Graph) -> list[str]:
    out = [f"import loop: {' <-> '.join(c)}" for c in loops(graph)]
    for a, bs in sorted(graph.edges.items()):
        if a.startswith("lora_course.quant"):
            for b in sorted(bs):
                if not b.startswith(QUANT_MAY_IMPORT) and b != PACKAGE:
                    out.append(f"quantization imports {b}: {a} -> {b}")
        if not a.startswith(LIBRARY_EXEMPT):
            for b in sorted(bs):
                if b.startswith("lora_course.experiments"):
                    out.append(f"library module imports experiments: {a} -> {b}")
    for importer, mod, name in graph.private:
        out.append(f"private import: {importer} imports {mod}.{name}")
    for name, n in sorted(graph.lines.items()):
        if n > MAX_LINES:
            out.append(f"module over {MAX_LINES} lines: {name} ({n})")
    return out


def figures(graph: Graph) -> dict[str, object]:
    largest = max(graph.lines, key=graph.lines.get)
    return {
        "modules": len(graph.modules),
        "import arrows": sum(len(b) for b in graph.edges.values()),
        "loops": len(loops(graph)),
        "private imports": len(graph.private),
        "largest module": f"{largest} ({graph.lines[largest]} lines)",
    }


def main() -> int:
    graph = build()
    for key, value in figures(graph).items():
        print(f"{key}: {value}")
    broken = violations(graph)
    for line in broken:
        print("  " + line)
    print(f"rules broken: {len(broken)}")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
