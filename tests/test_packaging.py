"""Packaging: the licence file matches the declared licence, and every third-party package the code
imports is declared in pyproject.toml (an undeclared one works here by accident and fails on a
fresh install)."""

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

from tests.helpers import REPO


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _imported_top_level_modules(paths) -> dict[str, str]:
    """{top-level module: first file importing it} over the given files, imports inside
    functions included."""
    found = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], os.path.relpath(path, REPO))
    return found


def test_every_imported_third_party_package_is_declared():
    package = os.path.join(REPO, "simclr_jax")
    files = [os.path.join(package, f) for f in sorted(os.listdir(package)) if f.endswith(".py")]
    files.append(os.path.join(REPO, "run.py"))
    modules = _imported_top_level_modules(files)
    declared = {
        _normalize(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0])
        for d in _pyproject()["project"]["dependencies"]
    }
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(modules.items()):
        if module in sys.stdlib_module_names or module in ("simclr_jax", "configs"):
            continue
        dists = {_normalize(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (imported in {where}; distribution {sorted(dists)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_license_file_matches_the_declared_license():
    declared = _pyproject()["project"]["license"]
    declared = declared["text"] if isinstance(declared, dict) else declared
    assert declared == "Apache-2.0"
    with open(os.path.join(REPO, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a stub
