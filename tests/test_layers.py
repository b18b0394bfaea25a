"""The package's modules import one way, floor by floor (issue 32, item 4):

I/O and geometry -> models -> pretraining -> APE/BPR features -> localization -> nnU-Net -> entry points (CLI, demo).

A module may import its own floor and the floors below it, never a floor above, so there is no import circle between
floors; within a floor there must be none either. The imports are read from the source with ``ast`` (at any depth,
imports inside functions included; nothing is run), as ``shared/tools/import_cycles.py`` reads them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nnunet_ape

PACKAGE = Path(nnunet_ape.__file__).resolve().parent
NAME = PACKAGE.name

# Floors from the ground up: each maps module name prefixes (without the package name) to the floor.
# The longest matching prefix wins, so ``bpr.train_bpr`` sits on pretraining while the rest of ``bpr`` is a feature.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("I/O and geometry", ("atomic", "errors", "io", "intensity", "resample", "crop_geometry", "canonical", "inputs",
                          "input_checks", "cases", "case_variants", "locks", "threads", "gpu_processes", "distributed", "resume",
                          "plots", "training_log", "phantoms", "position_fit", "segmentation_scores")),
    ("models", ("models", "checkpoint")),
    ("pretraining", ("pretrain", "bpr.train_bpr", "bpr.augment", "bpr.losses", "bpr.slices")),
    ("APE/BPR features", ("embed", "embed_files", "bpr")),
    ("localization", ("localize", "case_features")),
    ("nnU-Net", ("nnunet",)),
    ("entry points", ("cli", "demo", "__main__")),
)
NNUNET_FLOOR = "nnU-Net"


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name (``nnunet_ape.bpr.scoring``; a package by its ``__init__``) -> source file."""
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> list[str]:
    """Every absolute module name an import statement of ``path`` names (``from a import b`` names ``a`` and
    ``a.b``), relative imports resolved against ``module``."""
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports. Imports of a package's ``__init__`` alone are left out (as the
    tool does: importing ``nnunet_ape.bpr`` for ``nnunet_ape.bpr.scoring`` is not an edge to ``bpr/__init__``)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in _imported_names(module, path):
            target = resolve(name) if name.split(".")[0] == NAME else None
            if target and target != module and modules[target].name != "__init__.py":
                graph[module].add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def floor_of(module: str) -> int | None:
    """Index in :data:`FLOORS` of a package module (longest prefix wins); None where no floor names it."""
    rel = module.removeprefix(NAME).removeprefix(".")
    best, best_length = None, -1
    for floor, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = floor, len(prefix)
    return best


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    """``a (floor) -> b (higher floor)`` for each import against the floor order."""
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = floor_of(module), floor_of(target)
            if a is not None and b is not None and b > a:
                out.append(f"{module} ({FLOORS[a][0]}) -> {target} ({FLOORS[b][0]})")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(package_modules())


def test_every_module_is_on_a_floor(graph):
    homeless = [m for m in graph if m != NAME and floor_of(m) is None]
    packages = {m for m, path in package_modules().items() if path.name == "__init__.py"}
    homeless = [m for m in homeless if m not in packages]  # a package's __init__ is on the floor of its modules
    assert not homeless, f"modules on no floor (add them to FLOORS in {Path(__file__).name}): {homeless}"


def test_no_import_circle(graph):
    circles = import_circles(graph)
    assert not circles, "import circles:\n" + "\n".join(
        f"  {len(c)} modules: " + "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in circles)


def test_imports_follow_the_floor_order(graph):
    violations = floor_violations(graph)
    assert not violations, "imports against the floor order:\n  " + "\n  ".join(violations)


def test_only_the_nnunet_subpackage_imports_nnunet():
    floor = next(i for i, (name, _) in enumerate(FLOORS) if name == NNUNET_FLOOR)
    outside = []
    for module, path in sorted(package_modules().items()):
        names = _imported_names(module, path)
        if any(n.split(".")[0] == "nnunetv2" for n in names) and floor_of(module) != floor:
            outside.append(module)
    assert not outside, f"modules outside nnunet_ape.nnunet that import nnunetv2: {outside}"


def test_the_checks_see_a_circle_and_an_upward_import():
    """The checks themselves: a made-up graph with a circle and a ground-floor module importing the nnU-Net floor."""
    made_up = {f"{NAME}.io": {f"{NAME}.nnunet.x"}, f"{NAME}.nnunet.x": {f"{NAME}.io"}, f"{NAME}.errors": set()}
    assert import_circles(made_up) == [[f"{NAME}.io", f"{NAME}.nnunet.x"]]
    assert floor_violations(made_up) == [f"{NAME}.io (I/O and geometry) -> {NAME}.nnunet.x (nnU-Net)"]
    assert floor_of(f"{NAME}.bpr.train_bpr") < floor_of(f"{NAME}.bpr.scoring") < floor_of(f"{NAME}.localize.localizer")


def test_an_nnunet_checkpoint_without_its_reader_is_one_line(tmp_path, monkeypatch):
    """The ground floor reads no nnU-Net checkpoint itself: with no reader registered it says so in one line; with
    the nnU-Net subpackage's reader a segmentation checkpoint is refused by that reader."""
    import torch

    from nnunet_ape import checkpoint
    from nnunet_ape.errors import InputError
    from nnunet_ape.nnunet.checkpoint_reader import read_nnunet_checkpoint

    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "init_args": {}, "trainer_name": "nnUNetTrainer"}, path)
    monkeypatch.setattr(checkpoint, "_READERS", [])
    for load in (checkpoint.load_ape_model, checkpoint.load_ape_settings):
        with pytest.raises(InputError, match="an nnU-Net checkpoint, and no reader for it is registered") as error:
            load(path)
        assert "\n" not in str(error.value)
    checkpoint.register_checkpoint_reader(read_nnunet_checkpoint)
    checkpoint.register_checkpoint_reader(read_nnunet_checkpoint)
    assert checkpoint._READERS == [read_nnunet_checkpoint]
    with pytest.raises(InputError, match="an nnU-Net segmentation checkpoint"):
        checkpoint.load_ape_model(path)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(InputError, match="not an nnunet-ape/ape-v1 checkpoint"):
        checkpoint.load_ape_model(other)


def test_the_ground_floor_imports_no_reader_and_the_cli_registers_one():
    """In a fresh interpreter: importing nnunet_ape.checkpoint registers nothing and imports no nnU-Net code;
    importing the CLI registers the nnU-Net subpackage's reader."""
    import subprocess
    import sys

    code = ("import sys; import nnunet_ape.checkpoint as c; "
            "assert not c._READERS and not any(m.startswith(('nnunet_ape.nnunet', 'nnunetv2')) for m in sys.modules); "
            "import nnunet_ape.cli.main; from nnunet_ape.nnunet.checkpoint_reader import read_nnunet_checkpoint; "
            "assert c._READERS == [read_nnunet_checkpoint], c._READERS")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
