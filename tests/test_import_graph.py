"""Imports flow one way through the layers of docs/ARCHITECTURE.md.

Every module of `parti_from_scratch/` and `weights_convert/` is parsed with `ast`
(nothing is imported or run). An edge A -> B is recorded for

- `import B`, `from B import x`, relative imports resolved against A's package,
  at module level and inside functions and methods alike;
- `importlib.import_module("B")` with a literal argument;
- any other string literal that is exactly the dotted name of a module here
  (the package facade's lazy table of public names is such a table).

The checks: every module has a layer; no cycle between modules; every edge goes
down the layer order (or stays inside one layer); the one exception is a
documented one-line `from_pretrained`/`save_pretrained` shim, listed below by
name, whose body is its docstring, one import from `weights_convert` and one
call. Run this file directly to print the module and layer graphs:

    python tests/test_import_graph.py
"""
from __future__ import annotations

import ast
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("parti_from_scratch", "weights_convert")


# ----------------------------------------------------------------------------------------------- the rule

@dataclass(frozen=True)
class Layer:
    """A layer: the modules it holds (dotted names; a name also covers its submodules) and what it may import.

    may_import=None means every layer listed before it; a tuple narrows that to the named layers.
    A package's own `__init__` is matched only by an exact entry (see the facade).
    """
    name: str
    modules: Tuple[str, ...]
    may_import: Optional[Tuple[str, ...]] = None
    exact: bool = False


# Bottom to top, the order of docs/ARCHITECTURE.md. Layers on one line of that diagram
# (clip | diffusion, unet | vae | parti) are siblings: neither imports the other.
LAYERS: Tuple[Layer, ...] = (
    Layer("base", ("parti_from_scratch.configuration", "parti_from_scratch.figures", "parti_from_scratch.outputs",
                   "parti_from_scratch.sampling_defaults")),
    Layer("data", ("parti_from_scratch.data",), may_import=()),
    Layer("nn", ("parti_from_scratch.nn",), may_import=("base",)),
    Layer("clip", ("parti_from_scratch.clip",), may_import=("base", "nn")),
    Layer("diffusion", ("parti_from_scratch.diffusion",), may_import=("base", "nn")),
    Layer("unet", ("parti_from_scratch.unet",), may_import=("base", "nn", "clip", "diffusion")),
    Layer("vae", ("parti_from_scratch.vae",), may_import=("base", "nn", "clip", "diffusion")),
    Layer("parti", ("parti_from_scratch.parti",), may_import=("base", "nn", "clip")),
    Layer("pipeline", ("parti_from_scratch.pipeline", "parti_from_scratch.parti_pipeline")),
    Layer("weights_convert", ("weights_convert",)),
    Layer("train", ("parti_from_scratch.train",)),
    Layer("cli", ("parti_from_scratch.cli", "parti_from_scratch.__main__")),
    Layer("facade", ("parti_from_scratch",), exact=True),
)

# The only upward edges: each is a method whose body is its docstring, one import from
# `weights_convert` and one call. The models keep `X.from_pretrained(path)` (the tutorial's
# listing calls it) while the knowledge of foreign file layouts stays in weights_convert.
PERMITTED_SHIMS: Tuple[str, ...] = (
    "parti_from_scratch.clip.model._Pretrained.from_pretrained",
    "parti_from_scratch.clip.model._Pretrained.save_pretrained",
    "parti_from_scratch.unet.UNet2DConditionModel.from_pretrained",
    "parti_from_scratch.unet.UNet2DConditionModel.save_pretrained",
    "parti_from_scratch.vae.AutoencoderKL.from_pretrained",
    "parti_from_scratch.vae.AutoencoderKL.save_pretrained",
    "parti_from_scratch.pipeline.TextToImagePipeline.from_pretrained",
    "parti_from_scratch.pipeline.TextToImagePipeline.save_pretrained",
    "parti_from_scratch.parti.vit_vqgan.ViTVQModel.from_pretrained",
    "parti_from_scratch.parti.vit_vqgan.ViTVQModel.save_pretrained",
    "parti_from_scratch.parti.vqgan.VQModel.from_pretrained",
    "parti_from_scratch.parti.vqgan.VQModel.save_pretrained",
    "parti_from_scratch.parti.value_chroma.ValueChromaVQModel.from_pretrained",
    "parti_from_scratch.parti.value_chroma.ValueChromaVQModel.save_pretrained",
    "parti_from_scratch.parti_pipeline.PartiPipeline.from_pretrained",
    "parti_from_scratch.parti_pipeline.PartiPipeline.save_pretrained",
)
SHIM_TARGET_LAYER = "weights_convert"
SHIM_METHODS = ("from_pretrained", "save_pretrained")
SHIM_DOC_MARK = "documented upward edge"


# ----------------------------------------------------------------------------------------------- the graph

@dataclass(frozen=True)
class Edge:
    """source imports target at path:line (path relative to the scanned root), inside `scope`
    (the enclosing function's dotted name; None at module or class level)."""
    source: str
    target: str
    path: Path
    line: int
    scope: Optional[str]
    kind: str  # "import" | "import_module" | "name"

    def where(self) -> str:
        inside = f" (in {self.scope})" if self.scope else ""
        return f"{self.path.as_posix()}:{self.line}{inside}"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  [{self.where()}, {self.kind}]"


def discover_modules(root: Path, packages: Sequence[str]) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py under each package folder of `root`."""
    modules: Dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: Mapping[str, Path]) -> Optional[str]:
    """The longest prefix of `name` that is one of our modules, or None for a foreign import."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


class _ImportVisitor(ast.NodeVisitor):
    """Collects the edges of one module, remembering the enclosing class/function names."""

    def __init__(self, module: str, path: Path, modules: Mapping[str, Path]):
        self.module, self.path, self.modules = module, path, modules
        self.package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
        self.stack: List[str] = []
        self.functions = 0  # how many of the enclosing scopes are functions
        self.docstrings: Set[int] = set()
        self.edges: List[Edge] = []

    def _add(self, target: Optional[str], node: ast.AST, kind: str) -> None:
        if target is not None and target != self.module:
            scope = ".".join([self.module] + self.stack) if self.functions else None
            edge = Edge(self.module, target, self.path, node.lineno, scope, kind)
            if edge not in self.edges:  # `from m import a, b` is one edge
                self.edges.append(edge)

    def _note_docstring(self, node: ast.AST) -> None:
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            self.docstrings.add(id(body[0].value))

    def visit_Module(self, node: ast.Module) -> None:
        self._note_docstring(node)
        self.generic_visit(node)

    def _visit_scope(self, node, is_function: bool) -> None:
        self._note_docstring(node)
        self.stack.append(node.name)
        self.functions += is_function
        self.generic_visit(node)
        self.functions -= is_function
        self.stack.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_scope(node, is_function=False)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node, is_function=True)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_scope(node, is_function=True)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(_resolve(alias.name, self.modules), node, "import")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            if node.level - 1 >= len(base_parts):
                raise ValueError(f"{self.path}:{node.lineno}: relative import goes above the top package")
            base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        for alias in node.names:
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.modules else _resolve(base, self.modules), node, "import")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self._add(_resolve(node.args[0].value, self.modules), node, "import_module")
            self.docstrings.add(id(node.args[0]))  # counted once, as import_module
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # a string naming one of our modules is a lazy import (e.g. the facade's table of public names)
        if isinstance(node.value, str) and node.value in self.modules and id(node) not in self.docstrings:
            self._add(node.value, node, "name")


def parse_module(module: str, root: Path, modules: Mapping[str, Path]) -> Tuple[ast.Module, List[Edge]]:
    path = modules[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    visitor = _ImportVisitor(module, path.relative_to(root), modules)
    visitor.visit(tree)
    return tree, visitor.edges


@dataclass
class Graph:
    root: Path
    modules: Dict[str, Path]
    trees: Dict[str, ast.Module]
    edges: List[Edge]


def build_graph(root: Path, packages: Sequence[str]) -> Graph:
    modules = discover_modules(root, packages)
    trees, edges = {}, []
    for module in modules:
        trees[module], module_edges = parse_module(module, root, modules)
        edges.extend(module_edges)
    return Graph(root, modules, trees, edges)


# ----------------------------------------------------------------------------------------------- the checks

def layer_of(module: str, layers: Sequence[Layer]) -> Optional[Layer]:
    """The layer holding `module`: the entry that names it or its closest enclosing package."""
    best, best_len = None, -1
    for layer in layers:
        for prefix in layer.modules:
            matches = module == prefix if layer.exact else (module == prefix or module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def allowed_below(layers: Sequence[Layer]) -> Dict[str, Set[str]]:
    """Layer name -> the layers it may import (besides itself)."""
    allowed = {}
    for i, layer in enumerate(layers):
        earlier = [other.name for other in layers[:i]]
        allowed[layer.name] = set(earlier if layer.may_import is None else layer.may_import)
    return allowed


def layer_table_problems(layers: Sequence[Layer]) -> List[str]:
    """A layer may only be allowed to import layers listed before it: the table itself is one-way."""
    problems, seen = [], set()
    for layer in layers:
        for name in layer.may_import or ():
            if name not in seen:
                problems.append(f"layer {layer.name!r} may import {name!r}, which is not listed below it")
        seen.add(layer.name)
    return problems


def find_cycles(edges: Sequence[Edge]) -> List[List[Edge]]:
    """Each strongly connected group of modules (Tarjan), as the edges that run inside it."""
    succ: Dict[str, Set[str]] = defaultdict(set)
    for e in edges:
        succ[e.source].add(e.target)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[Set[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(set(succ) | {e.target for e in edges}):
        if v not in index:
            connect(v)
    return [sorted((e for e in edges if e.source in g and e.target in g), key=str) for g in groups]


def _find_function(tree: ast.Module, qualname: Sequence[str]) -> Optional[ast.FunctionDef]:
    body = tree.body
    node = None
    for name in qualname:
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name), None)
        if node is None:
            return None
        body = node.body
    return node if isinstance(node, ast.FunctionDef) else None


def shim_problems(graph: Graph, shims: Sequence[str], layers: Sequence[Layer]) -> List[str]:
    """Why a listed shim is not a one-line shim (empty when every listed shim is one).

    A shim is a method named from_pretrained/save_pretrained whose body is exactly: a docstring
    that says it is the documented upward edge, one import from the shim target layer, and one
    call (returned or not) of a name that import binds, with no call, lambda or comprehension
    in its arguments.
    """
    problems = []
    for shim in shims:
        module = _resolve(shim, graph.modules)
        if module is None or module == shim:
            problems.append(f"{shim}: no module of the package holds it")
            continue
        func = _find_function(graph.trees[module], shim[len(module) + 1:].split("."))
        where = graph.modules[module].relative_to(graph.root).as_posix()
        if func is None:
            problems.append(f"{shim}: listed as a shim but no such method in {where}")
            continue
        where = f"{where}:{func.lineno}"
        if func.name not in SHIM_METHODS:
            problems.append(f"{shim} ({where}): only {' and '.join(SHIM_METHODS)} may be shims")
        body = list(func.body)
        doc = ast.get_docstring(func)
        if doc is None or SHIM_DOC_MARK not in " ".join(doc.split()):
            problems.append(f"{shim} ({where}): the docstring must say it is the {SHIM_DOC_MARK}")
        else:
            body = body[1:]
        if len(body) != 2 or not isinstance(body[0], (ast.Import, ast.ImportFrom)) \
                or not isinstance(body[1], (ast.Return, ast.Expr)) or not isinstance(body[1].value, ast.Call):
            problems.append(f"{shim} ({where}): the body must be one import and one call, "
                            f"found {len(body)} statement(s): {[type(s).__name__ for s in body]}")
            continue
        imp, call = body[0], body[1].value
        imported = {(a.asname or a.name).split(".")[0] for a in imp.names}
        if isinstance(imp, ast.ImportFrom) and not imp.level:
            sources = [imp.module or ""]
        else:
            sources = [a.name for a in imp.names] if isinstance(imp, ast.Import) else ["<relative>"]
        for source in sources:
            target = _resolve(source, graph.modules)
            target_layer = layer_of(target, layers) if target else None
            if target_layer is None or target_layer.name != SHIM_TARGET_LAYER:
                problems.append(f"{shim} ({where}): imports {source!r}; a shim imports from {SHIM_TARGET_LAYER} "
                                "by absolute name")
        called = call.func
        while isinstance(called, ast.Attribute):
            called = called.value
        if not (isinstance(called, ast.Name) and called.id in imported):
            problems.append(f"{shim} ({where}): the call must be of the name the import binds")
        for arg in list(call.args) + [k.value for k in call.keywords]:
            for sub in ast.walk(arg):
                if isinstance(sub, (ast.Call, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                                    ast.GeneratorExp, ast.NamedExpr, ast.Await)):
                    problems.append(f"{shim} ({where}): argument at line {sub.lineno} computes something "
                                    f"({type(sub).__name__}); that belongs below the shim, in {SHIM_TARGET_LAYER}")
    return problems


def permitted_edges(graph: Graph, shims: Sequence[str], layers: Sequence[Layer]) -> List[Edge]:
    """The edges made by the import line of a listed shim (whether the shim is valid is shim_problems' job)."""
    return [e for e in graph.edges if e.scope in set(shims) and e.kind == "import"
            and (layer_of(e.target, layers) or Layer("?", ())).name == SHIM_TARGET_LAYER]


def unlayered_modules(graph: Graph, layers: Sequence[Layer]) -> List[str]:
    return sorted(m for m in graph.modules if layer_of(m, layers) is None)


def upward_edges(graph: Graph, layers: Sequence[Layer], shims: Sequence[str]) -> List[Edge]:
    """Edges that leave their layer for one it may not import, the permitted shims aside."""
    allowed = allowed_below(layers)
    permitted = set(permitted_edges(graph, shims, layers))
    bad = []
    for e in graph.edges:
        src, dst = layer_of(e.source, layers), layer_of(e.target, layers)
        if src is None or dst is None or src.name == dst.name or e in permitted:
            continue
        if dst.name not in allowed[src.name]:
            bad.append(e)
    return sorted(bad, key=str)


def module_cycles(graph: Graph, layers: Sequence[Layer], shims: Sequence[str]) -> List[List[Edge]]:
    """Cycles between modules. A permitted shim's import runs only when called, after both modules
    are loaded, so it is left out; every other edge, module level or not, counts."""
    permitted = set(permitted_edges(graph, shims, layers))
    return find_cycles([e for e in graph.edges if e not in permitted])


def layer_graph(graph: Graph, layers: Sequence[Layer]) -> Dict[Tuple[str, str], List[Edge]]:
    """(source layer, target layer) -> the module edges behind it, for edges between different layers."""
    out: Dict[Tuple[str, str], List[Edge]] = defaultdict(list)
    for e in graph.edges:
        src, dst = layer_of(e.source, layers), layer_of(e.target, layers)
        if src and dst and src.name != dst.name:
            out[(src.name, dst.name)].append(e)
    return dict(out)


def _report(title: str, lines: Sequence[object]) -> str:
    return title + "\n" + "\n".join(f"  {line}" for line in lines)


# ----------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(ROOT, PACKAGES)


def test_layer_table_is_one_way():
    assert not layer_table_problems(LAYERS), _report("layer table:", layer_table_problems(LAYERS))
    assert len({layer.name for layer in LAYERS}) == len(LAYERS)


def test_every_module_has_a_layer(graph):
    missing = unlayered_modules(graph, LAYERS)
    assert not missing, _report("modules with no layer (add them to LAYERS here and to docs/ARCHITECTURE.md):",
                                missing)


def test_facade_lazy_table_is_read(graph):
    """The facade's table of public names counts as imports, so the checker sees what it names."""
    facade_targets = {e.target for e in graph.edges if e.source == "parti_from_scratch" and e.kind == "name"}
    assert {"parti_from_scratch.pipeline", "parti_from_scratch.unet", "parti_from_scratch.clip.model"} \
        <= facade_targets, facade_targets


def test_permitted_shims_are_one_liners(graph):
    problems = shim_problems(graph, PERMITTED_SHIMS, LAYERS)
    assert not problems, _report("permitted shims that are not one-line shims:", problems)


def test_no_import_cycles(graph):
    cycles = module_cycles(graph, LAYERS, PERMITTED_SHIMS)
    lines = [f"cycle among {sorted({e.source for e in c})}:\n    " + "\n    ".join(map(str, c)) for c in cycles]
    assert not cycles, _report("import cycles:", lines)


def test_imports_flow_down_the_layers(graph):
    bad = upward_edges(graph, LAYERS, PERMITTED_SHIMS)
    lines = [f"{layer_of(e.source, LAYERS).name} -> {layer_of(e.target, LAYERS).name}: {e}" for e in bad]
    assert not bad, _report("edges against the layer order (docs/ARCHITECTURE.md):", lines)


# ------------------------------------------------------------------------- the checker can fail

def _write_package(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


SYNTHETIC_LAYERS = (
    Layer("low", ("pkg.low",)),
    Layer(SHIM_TARGET_LAYER, ("conv",)),
    Layer("high", ("pkg.high",)),
    Layer("facade", ("pkg",), exact=True),
)


def test_checker_reports_a_cycle_through_relative_and_function_imports(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": '"""pkg.high"""\nTABLE = {"A": "pkg.low.a"}\n',  # a docstring is not an import
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "from .b import thing\n",
        "pkg/low/b.py": "def f():\n    from . import c\n",
        "pkg/low/c.py": "import importlib\nimportlib.import_module('pkg.low.a')\n",
        "pkg/high.py": "",
        "conv/__init__.py": "",
    })
    g = build_graph(tmp_path, ("pkg", "conv"))
    assert {(e.source, e.target, e.kind) for e in g.edges} == {
        ("pkg", "pkg.low.a", "name"), ("pkg.low.a", "pkg.low.b", "import"),
        ("pkg.low.b", "pkg.low.c", "import"), ("pkg.low.c", "pkg.low.a", "import_module")}
    cycles = find_cycles(g.edges)
    assert len(cycles) == 1
    assert {(e.source, e.target) for e in cycles[0]} == {
        ("pkg.low.a", "pkg.low.b"), ("pkg.low.b", "pkg.low.c"), ("pkg.low.c", "pkg.low.a")}
    function_edge = next(e for e in cycles[0] if e.source == "pkg.low.b")
    assert function_edge.scope == "pkg.low.b.f" and function_edge.where().endswith("pkg/low/b.py:2 (in pkg.low.b.f)")


def test_checker_reports_upward_edges_and_shims_that_grew(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/high.py": "X = 1\n",
        "pkg/low.py": '''
            class Model:
                @classmethod
                def from_pretrained(cls, path):
                    """Load. The documented upward edge."""
                    from conv.load import load
                    return load(cls, path)

                def save_pretrained(self, folder):
                    """Save. The documented upward edge."""
                    from conv.load import save
                    folder = str(folder)
                    save(self, folder)

            def helper():
                from pkg.high import X
                from conv.load import load
                return X
            ''',
        "conv/__init__.py": "",
        "conv/load.py": "from pkg.low import Model\ndef load(cls, p): pass\ndef save(m, p): pass\n",
    })
    g = build_graph(tmp_path, ("pkg", "conv"))
    shims = ("pkg.low.Model.from_pretrained", "pkg.low.Model.save_pretrained", "pkg.low.Model.missing")
    problems = shim_problems(g, shims, SYNTHETIC_LAYERS)
    assert len(problems) == 2, problems
    assert "pkg.low.Model.save_pretrained" in problems[0] and "one import and one call" in problems[0]
    assert "pkg.low.Model.missing" in problems[1] and "no such method" in problems[1]
    up = {(e.source, e.target, e.scope) for e in upward_edges(g, SYNTHETIC_LAYERS, shims)}
    assert up == {("pkg.low", "pkg.high", "pkg.low.helper"), ("pkg.low", "conv.load", "pkg.low.helper")}
    # the listed shims' own imports close a cycle with conv.load; only helper's import is reported
    cycles = module_cycles(g, SYNTHETIC_LAYERS, shims)
    assert [sorted((e.source, e.target, e.scope) for e in c) for c in cycles] == [
        [("conv.load", "pkg.low", None), ("pkg.low", "conv.load", "pkg.low.helper")]]


def test_checker_rejects_a_shim_that_computes_or_imports_elsewhere(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/high.py": "def load(*a): pass\n",
        "pkg/low.py": '''
            class Model:
                def from_pretrained(cls, path):
                    """The documented upward edge."""
                    from conv.load import load
                    return load(cls, open(path).read())

                def save_pretrained(self, folder):
                    """The documented upward edge."""
                    from pkg.high import load
                    return load(self, folder)
            ''',
        "conv/__init__.py": "",
        "conv/load.py": "def load(*a): pass\n",
    })
    g = build_graph(tmp_path, ("pkg", "conv"))
    problems = shim_problems(g, ("pkg.low.Model.from_pretrained", "pkg.low.Model.save_pretrained"),
                             SYNTHETIC_LAYERS)
    assert len(problems) == 3, problems  # two nested calls in from_pretrained, a wrong target in save_pretrained
    assert sum("computes something" in p for p in problems) == 2
    assert "imports 'pkg.high'" in problems[2]


# ----------------------------------------------------------------------------------------------- printing

def describe(graph: Graph) -> Iterator[str]:
    """The layer graph, then the module edges between layers, then the findings."""
    yield "layer graph (source layer -> target layer: number of import sites):"
    for (src, dst), edges in sorted(layer_graph(graph, LAYERS).items()):
        yield f"  {src} -> {dst}: {len(edges)}"
    permitted = permitted_edges(graph, PERMITTED_SHIMS, LAYERS)
    yield f"permitted shim edges: {len(permitted)}"
    for e in permitted:
        yield f"  {e}"
    for problem in shim_problems(graph, PERMITTED_SHIMS, LAYERS):
        yield f"shim problem: {problem}"
    for module in unlayered_modules(graph, LAYERS):
        yield f"no layer: {module}"
    for cycle in module_cycles(graph, LAYERS, PERMITTED_SHIMS):
        yield "cycle:"
        for e in cycle:
            yield f"  {e}"
    cycles = module_cycles(graph, LAYERS, PERMITTED_SHIMS)
    upward = upward_edges(graph, LAYERS, PERMITTED_SHIMS)
    for e in upward:
        yield f"upward: {layer_of(e.source, LAYERS).name} -> {layer_of(e.target, LAYERS).name}: {e}"
    yield f"{len(graph.modules)} modules, {len(graph.edges)} import sites, {len(cycles)} cycle(s), " \
          f"{len(upward)} upward edge(s) besides the shims"


if __name__ == "__main__":
    print("\n".join(describe(build_graph(ROOT, PACKAGES))))
    sys.exit(0)
