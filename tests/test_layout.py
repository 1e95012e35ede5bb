"""The layout's rules (README "Layout"): imports point one way, no import circles, torch stays out of the runtime,
and every module's first line says what it holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"usam_bioimageio": ROOT / "usam_bioimageio", "usam_exporters": ROOT / "exporters"}

# Higher may import lower or equal, never the reverse (usam_exporters counts as a group of its own).
RANKS = {
    "errors": 0, "settings": 0, "registry": 0, "progress": 0, "filters": 0, "io": 0,
    "runtime": 1,
    "embeddings": 2,
    "prompting": 3,
    "automatic": 4,
    "evaluation": 5, "training": 5, "usam_exporters": 5, "volumes": 5, "tracking": 5,
    "cli": 6,
}
# torch modules: only for the exporters, training and modeling itself
MODELING_USERS = {"modeling", "training", "usam_exporters"}


def _modules():
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            parts = (top,) + (rel[:-1] if rel[-1] == "__init__" else rel)
            yield ".".join(parts), path


MODULES = dict(_modules())


def _group(module: str) -> str:
    top, *rest = module.split(".")
    if top == "usam_exporters":
        return "usam_exporters"
    return rest[0] if rest else "__init__"


def _imports(module: str, path: Path):
    """(imported module, deferred) for every import of our packages in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name, id(node) not in top_level


def test_every_module_says_what_it_holds():
    for module, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()[0]) > 10, f"{module}: the first line must say what the module holds"


def test_every_folder_has_a_rank():
    """A new folder must be placed in RANKS (or be modeling), so that its imports are checked."""
    unranked = {_group(m) for m in MODULES} - set(RANKS) - {"modeling", "__init__", "__main__"}
    assert not unranked, f"add {sorted(unranked)} to RANKS"


def test_imports_point_one_way():
    wrong = []
    for module, path in MODULES.items():
        group = _group(module)
        for target, _ in _imports(module, path):
            tgroup = _group(target)
            if tgroup == "modeling" and group not in MODELING_USERS:
                wrong.append(f"{module} -> {target} (modeling is for exporters and training)")
            elif group == "evaluation" and tgroup == "training":
                wrong.append(f"{module} -> {target} (evaluation runs without torch)")
            elif tgroup in RANKS and group in RANKS and RANKS[tgroup] > RANKS[group]:
                wrong.append(f"{module} -> {target} (upward: {group} is below {tgroup})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = {m: {t for t, _ in _imports(m, p) if not (t.startswith(m + ".") or m.startswith(t + "."))}
             for m, p in MODULES.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", ["usam_bioimageio.cli.main", "usam_bioimageio.evaluation.report",
                                    "usam_bioimageio.automatic.amg.generator", "usam_bioimageio.prompting.tiled"])
def test_runtime_imports_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rules_can_fail(tmp_path):
    """The walker sees deferred and relative imports (so the rules above are not vacuous)."""
    sample = tmp_path / "x.py"
    sample.write_text('"""x."""\ndef f():\n    from ..training import trainer\n')
    found = dict(_imports("usam_bioimageio.evaluation.x", sample))
    assert found["usam_bioimageio.training.trainer"] is True
