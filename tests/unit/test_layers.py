"""The package's import contract: stages import one way (cli > run > report > search | trial > record >
config), only run and report reach MLflow's module, nothing imports bench, no module over ~400 lines,
and no import cycle anywhere, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lora_sweep"

# Higher layers may import lower ones; a layer never imports one above it. search and trial are peers
# and may not import each other.
LAYERS = [("cli", "__main__"), ("run",), ("report",), ("search", "trial"), ("tracking",), ("record",), ("config",)]
PEERS_APART = {"search": "trial", "trial": "search"}
TRACKING_USERS = {"run", "report", "bench"}
MAX_LINES = 400


def modules(root: Path) -> dict[str, Path]:
    """lora_sweep.x.y -> its file, for every module of the package at root."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that this module imports, wherever the import statement stands."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if stage(module) in names:
            return i
    return None


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            s, d = stage(src), stage(dst)
            if d == "bench" and s != "bench":
                out.append(f"{src} imports {dst}: nothing in the product imports bench")
            if d == "tracking" and s not in TRACKING_USERS:
                out.append(f"{src} imports {dst}: only run and report reach MLflow's module")
            ls, ld = layer_of(src), layer_of(dst)
            if s != d and ls is not None and ld is not None and (ld < ls or PEERS_APART.get(s) == d):
                out.append(f"{src} ({s}) imports {dst} ({d}): {d} is not below {s}")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_stages_import_one_way():
    assert violations(graph(PACKAGE)) == []


def test_no_import_cycle():
    assert cycles(graph(PACKAGE)) == []


def test_every_module_has_a_stage():
    unplaced = [m for m in modules(PACKAGE) if m != "lora_sweep" and layer_of(m) is None and stage(m) != "bench"]
    assert unplaced == []


def test_modules_stay_readable():
    long = {m: n for m, p in modules(PACKAGE).items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "lora_sweep"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    # A function-level import closing a cycle between two modules of one stage.
    ({"trial/__init__.py": "", "trial/a.py": "from lora_sweep.trial import b\n",
      "trial/b.py": "def f():\n    from lora_sweep.trial.a import x\n"}, [["lora_sweep.trial.a", "lora_sweep.trial.b"]]),
    # Relative imports count too.
    ({"run/__init__.py": "", "run/a.py": "from . import b\n", "run/b.py": "from .a import y\n"},
     [["lora_sweep.run.a", "lora_sweep.run.b"]]),
])
def test_the_checker_finds_an_injected_cycle(tmp_path, files, expected):
    assert cycles(graph(_tree(tmp_path, files))) == expected


def test_the_checker_finds_upward_and_forbidden_imports(tmp_path):
    root = _tree(tmp_path, {
        "config/__init__.py": "def f():\n    import lora_sweep.search.space\n",
        "search/__init__.py": "", "search/space.py": "from lora_sweep.trial import data\n",
        "trial/__init__.py": "", "trial/data.py": "from lora_sweep import tracking\nimport lora_sweep.bench\n",
        "tracking.py": "", "bench/__init__.py": "",
    })
    found = violations(graph(root))
    assert any(v.startswith("lora_sweep.config (config) imports lora_sweep.search.space") for v in found)
    assert any(v.startswith("lora_sweep.search.space (search) imports lora_sweep.trial") for v in found)
    assert any("only run and report reach MLflow" in v for v in found)
    assert any("nothing in the product imports bench" in v for v in found)
