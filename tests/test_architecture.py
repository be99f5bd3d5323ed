"""The source tree's shape (CONTRIBUTING.md, "Layers"), read from the AST of every module under recsys/:

- the folders of recsys/ are the layers (core -> data -> models, evaluation -> methods -> pipeline -> entry
  points), imports point down them, and no import cycle joins recsys modules (a function-level import
  counts too);
- no method imports the pipeline (``recsys.pipeline``): a method declares what it needs and the pipeline
  provides it;
- the size limits of CONTRIBUTING.md (functions <= 60 lines, classes <= 250) hold, except the few listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "recsys"

# The layers, bottom up: each is a folder of recsys/ (a module may import only its own layer or a lower
# one); the package's top-level modules (cli, __init__) and the configs are the entry points above them.
LAYERS = [("core",), ("data",), ("models", "evaluation"), ("methods",), ("pipeline",)]
ENTRY = {"__init__", "cli", "conf", "plan"}
MAX_TOP_LEVEL_MODULES = 4  # besides the layer folders (CONTRIBUTING.md, "Layers")
LAYER_OF = {folder: i for i, floor in enumerate(LAYERS) for folder in floor} | {e: len(LAYERS) for e in ENTRY}

# functions and classes over the limits, and why (CONTRIBUTING.md, "Size limits")
SIZE_EXCEPTIONS = {
    # its docstring documents every knob of the generator (38 lines); the code itself is 30 lines
    "recsys.data.synthetic.make_domain": "the synthetic generator's documented knobs",
}
MAX_FUNCTION, MAX_CLASS = 60, 250


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The recsys modules that ``name`` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYER_OF[parts[1]] if len(parts) > 1 else LAYER_OF["__init__"]


def test_the_folders_are_the_layers():
    """Every folder of recsys/ is a layer, every layer a folder, and only the entry points sit beside them."""
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == {f for floor in LAYERS for f in floor}, folders
    top = {p.stem for p in PKG.glob("*.py")}
    assert top <= ENTRY and len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_no_method_imports_the_pipeline():
    bad = {(m, d) for m, deps in graph().items() if m.startswith("recsys.methods")
           for d in deps if d in ("recsys.pipeline.run", "recsys.pipeline.stages") or d.startswith("recsys.cli")}
    assert not bad, f"methods import the pipeline: {sorted(bad)}"


def test_imports_point_down_the_layers():
    up = {(m, d) for m, deps in graph().items() for d in deps
          if d != "recsys" and layer(d) > layer(m)}
    assert not up, f"imports pointing up a layer: {sorted(up)}"


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if d == "recsys":  # the package's __init__ (imports nothing of recsys)
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                cycle = visit(d)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def oversized() -> list[tuple[str, str, int]]:
    """(kind, qualified name, lines) of every function over MAX_FUNCTION and class over MAX_CLASS lines."""
    out = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = f"{prefix}.{child.name}"
                    n = child.end_lineno - child.lineno + 1
                    is_class = isinstance(child, ast.ClassDef)
                    if n > (MAX_CLASS if is_class else MAX_FUNCTION):
                        out.append(("class" if is_class else "function", qual, n))
                    walk(child, qual)

        walk(tree, name)
    return out


def test_size_limits():
    over = [(k, q, n) for k, q, n in oversized() if q not in SIZE_EXCEPTIONS]
    assert not over, "over the size limits (CONTRIBUTING.md): " + ", ".join(f"{k} {q} ({n} lines)" for k, q, n in over)


if __name__ == "__main__":  # python tests/test_architecture.py: the size report
    for kind, qual, n in sorted(oversized(), key=lambda x: -x[2]):
        print(f"{n:5d}  {kind:8s} {qual}{'  (exception: ' + SIZE_EXCEPTIONS[qual] + ')' if qual in SIZE_EXCEPTIONS else ''}")
