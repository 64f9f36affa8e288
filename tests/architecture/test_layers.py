"""The structure stays: no import cycle, nothing imports from a layer above, no private
name used from another module, no oversized non-kernel module (issue #12, DESIGN.md §2).

The import graph is read with `ast` from the source (module-level and function-level
imports, plus "package.module:function" strings that `importlib` resolves), so a lazy
import cannot hide an edge.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("configs", "experiments", "condensate_jax", "pallas_kernels")
# Top to bottom (DESIGN.md §2): a package may import only itself and those below it.
PACKAGE_RANK = {"configs": 3, "experiments": 2, "condensate_jax": 1, "pallas_kernels": 0}
# Inside condensate_jax, bottom to top; a module may import only lower or equal ranks.
CORE_RANK = {
    "spec": 0, "glossary": 0, "validation": 1, "geometry": 1, "softmax": 1, "finite": 2,
    "selection": 2, "impl": 3, "fast": 4, "attention": 5, "metrics": 5, "distributed": 5, "models": 6,
    "generate": 7, "lm": 8, "weights": 9, "train": 9, "__init__": 10,
}
MAX_LINES = 400
# Kernel files may hold one long kernel; their limit is the kernel package's.
KERNEL_MAX_LINES = 460
_TARGET = re.compile(r"^((?:%s)(?:\.\w+)+):\w+$" % "|".join(PACKAGES))


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources():
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      yield _module_name(path), path


MODULES = dict(_sources())


def _resolve(name: str) -> str | None:
  """The project module an import of `name` loads (a package or a module), or None."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def _edges(module: str, tree: ast.AST):
  """(imported module, line, imported names) of every import in `tree`."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno, ()
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = module.split(".")
        if not MODULES[module].name == "__init__.py":
          pkg = pkg[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield (sub if sub in MODULES else base), node.lineno, (
            () if sub in MODULES else (alias.name,))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      m = _TARGET.match(node.value)
      if m:
        yield m.group(1), node.lineno, ()


def _graph():
  graph, names = {}, {}
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text(), str(path))
    out = graph.setdefault(module, set())
    for target, line, imported in _edges(module, tree):
      dep = _resolve(target)
      if dep is not None and dep != module:
        out.add(dep)
        names.setdefault(module, []).append((dep, line, imported))
  return graph, names


GRAPH, IMPORTED_NAMES = _graph()


def _sccs(graph):
  """Tarjan's strongly connected components with more than one module."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _is_package_of(a: str, b: str) -> bool:
  """a is b's package (b's __init__ importing its own submodules is not a cycle edge)."""
  return b.startswith(a + ".")


def test_graph_is_read():
  # the test would pass vacuously if the parser missed the imports
  assert "condensate_jax.impl.xla_masked" in GRAPH["condensate_jax.attention"]
  assert "condensate_jax.impl.pallas_blocks" in GRAPH["condensate_jax.attention"]
  assert "pallas_kernels.block_sparse.api" in GRAPH["condensate_jax.fast.prefill"]
  assert len(MODULES) > 60


def test_no_import_cycle():
  # a package's __init__ re-exporting its submodules is the only allowed back edge
  graph = {v: {w for w in ws if not _is_package_of(w, v)} for v, ws in GRAPH.items()}
  assert _sccs(graph) == []


def _core_rank(module: str) -> int:
  part = module.split(".")[1] if "." in module else "__init__"
  return CORE_RANK[part]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_import(package):
  bad = []
  for module, deps in GRAPH.items():
    if module.split(".")[0] != package:
      continue
    for dep in deps:
      top = dep.split(".")[0]
      if PACKAGE_RANK[top] > PACKAGE_RANK[package]:
        bad.append(f"{module} -> {dep}")
      elif package == top == "condensate_jax" and module != "condensate_jax" and (
          _core_rank(dep) > _core_rank(module)) and not _is_package_of(module, dep):
        bad.append(f"{module} (rank {_core_rank(module)}) -> {dep} "
                   f"(rank {_core_rank(dep)})")
  assert bad == []


def test_every_core_module_has_a_rank():
  for module in MODULES:
    if module.startswith("condensate_jax."):
      _core_rank(module)   # KeyError: add the new module to CORE_RANK


def test_no_private_name_across_modules():
  bad = []
  for module, edges in IMPORTED_NAMES.items():
    for dep, line, imported in edges:
      bad += [f"{module}:{line} imports {dep}.{n}" for n in imported
              if n.startswith("_") and not n.startswith("__")]
  # attribute access on an imported project module: `alias._name`
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        aliases |= {(a.asname or a.name).split(".")[0] for a in node.names
                    if _resolve(a.name)}
      elif isinstance(node, ast.ImportFrom) and node.module:
        aliases |= {a.asname or a.name for a in node.names
                    if f"{node.module}.{a.name}" in MODULES}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        bad.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
  assert bad == []


def test_module_sizes():
  bad = []
  for module, path in MODULES.items():
    n = len(path.read_text().splitlines())
    limit = KERNEL_MAX_LINES if module.startswith("pallas_kernels.") else MAX_LINES
    if n > limit:
      bad.append(f"{module}: {n} lines > {limit}")
  assert bad == []


def test_implementation_table_is_complete_at_import():
  """Right after `import condensate_jax` the table holds every implementation, whatever
  was imported before; each entry resolves to a function (in a fresh interpreter)."""
  import subprocess
  import sys
  code = ("import condensate_jax as cj, importlib\n"
          "print(sorted(cj.IMPLEMENTATIONS))\n"
          "for t in cj.IMPLEMENTATIONS.values():\n"
          "  m, _, f = t.partition(':')\n"
          "  assert callable(getattr(importlib.import_module(m), f)), t\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, check=True).stdout
  assert out.splitlines()[0] == str(sorted(["pallas", "pallas_blocks", "pallas_select",
                                            "xla_blocks", "xla_gathered", "xla_indexed",
                                            "xla_masked"]))
