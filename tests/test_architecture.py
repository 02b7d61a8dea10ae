"""The package's shape, as docs/architecture.md draws it: layers that import one way, no
import cycles, one backend contract, one set of activation codes, and nothing that points
outside the repository."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

import bnkernels
from bnkernels import activations, backends
from bnkernels.backends.contract import Backend

PACKAGE = Path(bnkernels.__file__).resolve().parent
ROOT = PACKAGE.parent

# Each module's layer (docs/architecture.md); a module imports from its own layer or below.
LAYERS = [
    {"activations", "caches", "layout"},
    {"backends"},  # and everything below it
    {"ops"},
    {"autograd"},
    {"eager"},
    {"functional"},
    {"modules", "norm_act", "replace", "fuse", "convert", "fold_math", "fold", "sync_batch_norm"},
    {"selfcheck", "__init__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known) -> set:
    """The bnkernels modules a module imports, anywhere in it (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import x`: x may be a module
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles(graph):
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            cycle = trail[trail.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_layers_import_one_way(graph):
    upward = [(a, b) for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)]
    assert not upward, f"imports from a higher layer: {upward}"


def test_backends_do_not_import_each_other(graph):
    def family(m):
        parts = m.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "backends" else None

    crossing = [(a, b) for a, deps in graph.items() for b in deps
                if family(a) in ("triton", "cuda", "reference") and family(b) not in
                (None, "contract", family(a))]
    assert not crossing, crossing


@pytest.mark.parametrize("name", ["triton", "cuda", "torch"])
def test_every_backend_implements_the_contract(name):
    backend = backends.get(name)
    assert isinstance(backend, Backend) and backend.name == name


def test_one_set_of_activation_codes():
    """activations.py's codes, the Triton kernels' constexprs and csrc/bnk_api.h's enum."""
    from bnkernels.backends.triton import kernels
    codes = {None: activations.IDENTITY, "relu": activations.RELU, "silu": activations.SILU,
             "gelu": activations.GELU}
    assert codes == {a: activations.code(a) for a in activations.ACTIVATIONS}
    assert [kernels._IDENTITY.value, kernels._RELU.value, kernels._SILU.value,
            kernels._GELU.value] == [codes[a] for a in activations.ACTIVATIONS]
    header = (ROOT / "csrc" / "bnk_api.h").read_text()
    enum = dict((k.lower(), int(v)) for k, v in re.findall(r"BNK_ACT_(\w+) = (\d+)", header))
    assert enum == {"identity": codes[None], "relu": codes["relu"], "silu": codes["silu"],
                    "gelu": codes["gelu"]}


def test_nothing_points_outside_the_repository():
    """A clone has only the repository: the spec is docs/math.md, not a file beside it."""
    needle = "../" + "shared"  # (spelled so that this file does not match itself)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for rel in tracked.stdout.split():
        path = ROOT / rel
        if path.suffix in (".py", ".md", ".cu", ".cuh", ".h", ".sh", ".txt", ".toml", ".cfg") \
                or path.name in ("Makefile", "run"):
            if needle in path.read_text(errors="replace"):
                offenders.append(rel)
    assert not offenders, offenders


def test_the_call_records_refuse_ambiguous_fields():
    """Each field means one thing: a Normalizer holds rstd or a variance, never both."""
    import torch
    from bnkernels.backends.contract import BackwardCall, ForwardCall, GradSums, Normalizer
    v = torch.ones(3)
    with pytest.raises(ValueError, match="exactly one of rstd and var"):
        Normalizer(v, rstd=v, var=v)
    with pytest.raises(ValueError, match="exactly one of rstd and var"):
        Normalizer(v)
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="exactly one of running and batch"):
        ForwardCall(x, None, None, 1e-5, None, None, x)
    with pytest.raises(ValueError, match="come together"):
        BackwardCall(x, x, None, None, 1e-5, None, None, None, Normalizer(v, var=v), True,
                     given_sums=GradSums(v, v))
