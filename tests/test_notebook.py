"""The Colab notebook: valid nbformat-4 JSON; it runs nothing the TPU runtime lacks (TensorBoard),
keeps the runtime's jax, runs a smoke run before the long one and estimates the time from it, and
overrides only config keys that exist."""

import json
import os
import re

from tests.helpers import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "colab_tpu.ipynb")


def _cells():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(set(ids)) == len(ids)
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def _code(cells):
    return [src for kind, src in cells if kind == "code"]


def test_notebook_is_valid_and_needs_no_tensorboard():
    code = _code(_cells())
    assert not any("tensorboard" in src.lower() and src.lstrip().startswith("%") for src in code)
    assert not any(re.search(r"^\s*%(load_ext|tensorboard)", src, re.M) for src in code)


def test_notebook_keeps_the_runtimes_jax():
    code = _code(_cells())
    installs = [line for src in code for line in src.splitlines() if "pip install" in line]
    runtime = [line for line in installs if "tfds_env" not in line]  # the separate venv aside
    assert runtime and not any(re.search(r"\bjax\b|--upgrade|\s-U\b", line) for line in runtime)
    assert any('version("jax") == JAX_BEFORE' in src for src in code)


def test_notebook_smoke_runs_and_times_before_the_long_run():
    code = _code(_cells())
    smoke = next(i for i, src in enumerate(code) if "num_steps=" in src and "SMOKE" in src)
    estimate = next(i for i, src in enumerate(code) if "images_per_s" in src)
    long_run = next(i for i, src in enumerate(code) if "--mode=pretrain" in src)
    assert smoke < estimate < long_run
    assert "s per epoch" in code[estimate]


def test_notebook_overrides_only_existing_config_keys():
    from configs import cifar_simclr

    config = cifar_simclr.get_config()
    text = "\n".join(_code(_cells()))
    keys = re.findall(r"--config\.([\w.]+)=", text)
    assert keys
    for key in keys:
        node = config
        for part in key.split("."):
            assert part in node, f"--config.{key} is not a config key"
            node = node[part]
