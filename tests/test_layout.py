"""The package's layout holds what docs/architecture.md says of it: imports run one way down the
layers, the stages never import each other, and the report's builder imports no jax."""

import ast
import os
import subprocess
import sys

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "simclr_jax")
# Top to bottom: a module may import its own unit or any unit below it, never one above.
LAYERS = [
    ("app",),
    ("export",),
    ("stages",),
    ("report",),
    ("evaluation",),
    ("pretrained",),
    ("train",),
    ("core",),
    ("data",),
    ("runtime",),
    ("errors", "torch_layout"),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """simclr_jax.a.b -> a (a folder, or a module at the package's root)."""
    return module.split(".")[1]


def _imports() -> list[tuple[str, str, int, str]]:
    """(importing file, imported simclr_jax module, line, importing unit) for every import in the
    package, function-level ones included."""
    out = []
    for folder, _, names in os.walk(PACKAGE):
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, REPO)
            parts = rel[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__" and len(parts) == 2:
                continue  # the package's own __init__: load_encoder, imported lazily
            me = parts[1]
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "simclr_jax"
                ):
                    if node.module == "simclr_jax":
                        targets = [f"simclr_jax.{a.name}" for a in node.names]
                    else:
                        targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names if a.name.startswith("simclr_jax.")]
                else:
                    continue
                out += [(rel, t, node.lineno, me) for t in targets]
    return out


def test_every_module_has_a_layer_and_imports_run_down():
    imports = _imports()
    units = {me for _, _, _, me in imports} | {_unit(t) for _, t, _, _ in imports}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"
    up = [
        f"{path}:{line} imports {target}"
        for path, target, line, me in imports
        if _unit(target) != me and RANK[_unit(target)] < RANK[me]
    ]
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_the_stages_never_import_each_other():
    across = [
        f"{path}:{line} imports {target}"
        for path, target, line, me in imports_of("stages")
        if target.startswith("simclr_jax.stages.")
        and target.split(".")[2] != os.path.basename(path)[: -len(".py")]
    ]
    assert not across, "\n".join(across)


def imports_of(unit: str) -> list[tuple[str, str, int, str]]:
    return [row for row in _imports() if row[3] == unit]


def test_the_report_is_rebuilt_without_jax():
    code = (
        "import sys; import simclr_jax.report.build, simclr_jax.runtime.files; "
        "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
