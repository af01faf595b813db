"""Export to PyTorch (simclr_jax.export): the exported file, loaded into PyTorch by the code of
docs/pytorch.md itself (its builder with torchvision's key layout, strict=True; its ten
torchvision lines with that builder standing in for torchvision.models.resnet18, since CI has no
torchvision), gives the features of `load_encoder` on the same images to 1e-4 in float32.

Cases, each saved as a run saves it and never trained (`_calibrated`: random weights, every BN's
statistics those of its input): the demo's architecture (ResNet-18 at width 0.125, CIFAR stem) as
a pretraining checkpoint, h and z; ResNet-50 (Bottleneck blocks) with the ImageNet stem as an
encoder.msgpack; a width-1 ResNet-18 with the CIFAR stem through the ten lines; a fine-tuned
classifier's checkpoint with a kept head layer, its logits. Bad inputs are one-line errors, raised
before anything is written. Images are at the run's input size (no resize, whose filter PyTorch
users choose themselves)."""

import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from simclr_jax import export, pretrained
from simclr_jax.core import augment, resnet
from simclr_jax.core import networks as models
from simclr_jax.data import dataset
from simclr_jax.errors import CheckpointError, UserError
from simclr_jax.runtime.files import CONFIG_FILE
from simclr_jax.train import classifier, supervised
from simclr_jax.train.checkpoint import Checkpointer
from simclr_jax.train.state import abstract_pretrain_tree, checkpoint_meta
from tests.helpers import REPO, tiny_config

TOLERANCE = 1e-4  # max |PyTorch - load_encoder|, float32
# torchvision 0.29.1's resnet18().state_dict() and resnet50()'s hold 122 and 320 entries, fc's
# weight and bias among them (counted once in a venv with torchvision; CI has none).
TORCHVISION_KEYS = {"resnet18": 122 - 2, "resnet50": 320 - 2}


def _config(name="resnet18", stem="cifar", width=0.125, image_size=16, **overrides):
    return tiny_config(
        **{"model.name": name, "model.stem": stem, "model.width": width},
        **{"data.image_size": image_size},
        **overrides,
    )


def _write_config(workdir: str, config) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _random_variables(model, config, seed: int = 0) -> dict:
    """`model`'s variables (traced, never initialised), drawn at random: kernels He-normal, BN
    biases around 0 and scales in [0.5, 1.5], a block's last BN's in [0.1, 0.5] (the init's zeros
    would hide the block's convs; a trained ResNet's, started at 0, stay small: at 0.5-1.5 the
    residual stream of a ResNet-50 grows to |h| ~ 25, where float32 itself is off by 4e-4 (PyTorch
    in float32 against float64)); running statistics 0 (`_calibrated` sets them)."""
    size = config.data.image_size
    x = np.zeros((1, size, size, 3), np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    flat = traverse_util.flatten_dict(shapes)
    norms: dict[tuple, list[str]] = {}  # block -> its BNs (bn1, bn2[, bn3])
    for path in flat:
        if len(path) > 2 and "_block" in path[-3] and re.fullmatch(r"bn\d", path[-2]):
            norms.setdefault(path[:-2], []).append(path[-2])
    last = {block + (max(names),) for block, names in norms.items()}
    rng = np.random.default_rng(seed)
    for path, leaf in flat.items():
        if path[-1] == "kernel":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
        elif path[-1] == "scale":
            value = rng.uniform(*((0.1, 0.5) if path[:-1] in last else (0.5, 1.5)), leaf.shape)
        elif path[-1] == "bias":
            value = rng.normal(0.0, 0.2, leaf.shape)
        else:  # a running mean or variance
            value = np.zeros(leaf.shape)
        flat[path] = np.asarray(value, np.float32)
    return traverse_util.unflatten_dict(flat)


def _calibrated(model, config, seed: int = 0) -> dict:
    """`_random_variables` with every BN's running statistics those of its input on a batch of
    random images (other images than the tests feed), as a trained network's are: activations
    stay O(1) through the network rather than growing block after block."""
    variables = _random_variables(model, config, seed)
    spec = augment.spec_from_config(config)
    x = pretrained.preprocess(_images(16, config.data.image_size, seed=seed + 100), spec)
    _, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables
    )
    # running = m * 0 + (1 - m) * the batch's
    stats = jax.tree.map(lambda s: np.asarray(s) / (1 - resnet.BN_MOMENTUM), updates)
    return {"params": variables["params"], **stats}


def _checkpoint(directory: str, target: dict, variables: dict, step: int, meta: dict) -> None:
    """A checkpoint as a run saves one: `target`'s tree (the restore target: shapes) with the
    optimizer state at 0, `variables` as its params and batch_stats."""
    tree = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
    tree.update(variables, step=np.asarray(step, tree["step"].dtype))
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(step, tree, meta)
    ckpt.close()


def _saved_encoder(workdir: str, config, calibrate: bool = True) -> str:
    """A run directory as pretraining leaves one: config.json and encoder.msgpack (f and g)."""
    model = models.build_model(config.model)
    variables = (_calibrated if calibrate else _random_variables)(model, config)
    _write_config(workdir, config)
    pretrained.export(variables, os.path.join(workdir, pretrained.EXPORT_FILE))
    return workdir


@pytest.fixture(scope="module")
def docs():
    """The Python of docs/pytorch.md, run: its builder's namespace and its ten torchvision lines."""
    pytest.importorskip("torch")
    text = open(os.path.join(REPO, "docs", "pytorch.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (builder,) = [b for b in blocks if "def load(" in b]
    (ten_lines,) = [b for b in blocks if "getattr(torchvision.models" in b]
    (feed,) = [b for b in blocks if 'load("digits.safetensors")' in b]
    namespace: dict = {}
    exec(compile(builder, "docs/pytorch.md", "exec"), namespace)
    return types.SimpleNamespace(ns=namespace, ten_lines=ten_lines, feed=feed)


def _pixels(images, meta):
    """What docs/pytorch.md feeds the network: NCHW, [0, 1], normalised with the JSON's stats."""
    import torch

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (x - mean) / std


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A workdir holding a pretraining checkpoint of the demo's architecture (ResNet-18, width
    0.125, CIFAR stem) at step 2, saved as pretraining saves it (its state tree and metadata), with
    `_calibrated` variables. Two real pretraining steps in-process cost 199 s on this 2-core
    machine, most of it compiling the step: too slow for the suite."""
    workdir = str(tmp_path_factory.mktemp("export") / "demo")
    config = _config()
    variables = _calibrated(models.build_model(config.model), config)
    _write_config(workdir, config)
    directory = os.path.join(workdir, "checkpoints", "pretrain")
    meta = checkpoint_meta(config, "pretrain")
    _checkpoint(directory, abstract_pretrain_tree(config), variables, 2, meta)
    return workdir


@pytest.mark.torch
def test_the_demo_encoder_and_head_give_load_encoders_h_and_z_in_pytorch(
    demo_run, docs, tmp_path, monkeypatch
):
    import torch

    out = str(tmp_path / "digits.safetensors")
    meta = export.export(demo_run, out, head=True)
    enc = pretrained.load_encoder(demo_run)
    assert meta["step"] == enc.step == 2 and meta["source"] == enc.source
    assert (meta["arch"], meta["base_channels"], meta["stem"]) == ("resnet18", 8, "cifar")
    assert meta["mean"] == list(enc.config.data.mean) and not meta["stock_torchvision"]
    assert json.load(open(tmp_path / "digits.json")) == meta
    assert os.stat(out).st_mode == os.stat(tmp_path / "digits.json").st_mode  # the umask's
    keys = [k for k in load_file(out) if not k.startswith("head.")]
    assert len(keys) == TORCHVISION_KEYS["resnet18"]  # torchvision's keys, fc left out
    images = dataset.load(enc.config.data).test.read(np.arange(64))  # (64, 16, 16, 3) uint8
    monkeypatch.chdir(tmp_path)
    fed = {**docs.ns, "images": images}
    exec(compile(docs.feed, "docs/pytorch.md", "exec"), fed)  # load, normalise, h = model(x)
    assert fed["meta"] == meta
    with torch.no_grad():
        z = fed["model"].head(fed["h"])
    want_h, want_z = enc(images, projection=True)
    assert _max_diff(fed["h"], want_h) <= TOLERANCE and _max_diff(z, want_z) <= TOLERANCE
    assert float(np.std(want_h)) > 0.01  # features that differ from image to image


@pytest.mark.torch
@pytest.mark.parametrize(
    "name, stem, image_size",
    [("resnet50", "imagenet", 32)],
)
def test_an_export_gives_load_encoders_features_in_pytorch(docs, tmp_path, name, stem, image_size):
    import torch

    run = _saved_encoder(str(tmp_path / "run"), _config(name, stem, image_size=image_size))
    out = str(tmp_path / "f.safetensors")
    meta = export.export(run, out)
    assert len(load_file(out)) == TORCHVISION_KEYS[name]  # torchvision's keys, fc left out
    model, _ = docs.ns["load"](out)  # strict=True: no key missing or left over
    images = _images(16, image_size)
    with torch.no_grad():
        h = model(_pixels(images, meta))
    assert meta["feature_dim"] == h.shape[1] and meta["step"] is None
    assert _max_diff(h, pretrained.load_encoder(run)(images)) <= TOLERANCE


@pytest.mark.torch
def test_the_ten_torchvision_lines_load_a_width_1_export_with_the_cifar_stem(
    docs, tmp_path, monkeypatch
):
    """docs/pytorch.md's ten lines, with its builder at width 1 (torchvision's resnet18: ImageNet
    stem, fc = Linear(512, 1000)) standing in for torchvision.models.resnet18."""
    import torch

    ns = docs.ns
    run = _saved_encoder(str(tmp_path / "run"), _config(width=1.0))
    meta = export.export(run, str(tmp_path / "encoder.safetensors"))
    assert meta["stock_torchvision"] and meta["base_channels"] == 64

    def resnet18():
        model = ns["ResNet"](ns["BasicBlock"], [2, 2, 2, 2], 64, "imagenet")
        model.fc = torch.nn.Linear(512, 1000)
        return model

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(resnet18=resnet18)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.chdir(tmp_path)
    lines: dict = {}
    exec(compile(docs.ten_lines, "docs/pytorch.md", "exec"), lines)
    images = _images(8, 16)
    with torch.no_grad():
        h = lines["model"](_pixels(images, lines["meta"]))
    assert _max_diff(h, pretrained.load_encoder(run)(images)) <= TOLERANCE


def _classifier_workdir(workdir: str, kept: int, calibrate: bool = True):
    """(config, variables, flax model) of a 'finetune' run's checkpoint at step 3 in `workdir`,
    saved as a downstream run saves it, with 10 classes and the head's first `kept` layers."""
    config = _config(**{"downstream.ft_proj_selector": kept})
    _write_config(workdir, config)
    flax_model = models.build_model(config.model, 10, proj_layers=kept)
    variables = (_calibrated if calibrate else _random_variables)(flax_model, config)
    meta = supervised.run_meta(config, "finetune", 1, None)
    target = classifier.abstract_tree(config, 10)
    _checkpoint(os.path.join(workdir, "checkpoints", "finetune"), target, variables, 3, meta)
    return config, variables, flax_model


@pytest.mark.torch
def test_a_classifier_export_gives_its_logits_in_pytorch(docs, tmp_path):
    """A fine-tuned classifier that kept the projection head's first layer: fc =
    Sequential(Linear, BN, ReLU, Linear)."""
    import torch

    workdir = str(tmp_path / "run")
    config, variables, flax_model = _classifier_workdir(workdir, kept=1)
    out = str(tmp_path / "finetune.safetensors")
    meta = export.export(workdir, out, classifier_run="finetune")
    fc = {"run": "finetune", "num_classes": 10, "kept_head_layers": 1, "in_dim": 64}
    assert meta["classifier"] == fc and meta["step"] == 3
    model, _ = docs.ns["load"](out)
    assert isinstance(model.fc, torch.nn.Sequential) and len(model.fc) == 4
    images = _images(16, 16)
    with torch.no_grad():
        logits = model(_pixels(images, meta))
    x = pretrained.preprocess(images, augment.spec_from_config(config))
    want = jax.jit(lambda v: flax_model.apply(v, x, train=False))(variables)
    assert _max_diff(logits, want) <= TOLERANCE


def test_a_classifier_without_kept_layers_has_torchvisions_fc(tmp_path):
    """No kept head layer: fc is torchvision's own Linear(feature_dim, classes) (the layout only;
    the logits are checked with a kept layer above)."""
    workdir = str(tmp_path / "run")
    _, variables, _ = _classifier_workdir(workdir, kept=0, calibrate=False)
    out = str(tmp_path / "scratch.safetensors")
    meta = export.export(workdir, out, classifier_run="finetune")
    tensors = load_file(out)
    assert meta["classifier"]["in_dim"] == meta["feature_dim"] == 64
    assert {k for k in tensors if k.startswith("fc")} == {"fc.weight", "fc.bias"}
    np.testing.assert_array_equal(tensors["fc.weight"], variables["params"]["head"]["kernel"].T)
    np.testing.assert_array_equal(tensors["fc.bias"], variables["params"]["head"]["bias"])
    assert len(tensors) == TORCHVISION_KEYS["resnet18"] + 2


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_one_line_errors_before_anything_is_written(demo_run, tmp_path):
    out = tmp_path / "f.safetensors"
    cases = [
        (str(tmp_path / "nowhere"), {}, CheckpointError, "holds no pretrained encoder"),
        (demo_run, {"classifier_run": "finetune"}, CheckpointError, "holds no checkpoint"),
        (demo_run, {"classifier_run": "linear"}, UserError, "choose one of finetune"),
        (demo_run, {"classifier_run": "finetune", "head": True}, UserError, "exclude each other"),
    ]
    empty = tmp_path / "empty"  # a workdir with its config and no checkpoint
    _write_config(str(empty), _config())
    cases.append((str(empty), {}, CheckpointError, "holds no pretrained encoder"))
    tiny = _saved_encoder(str(tmp_path / "tiny"), tiny_config(), calibrate=False)
    cases.append((tiny, {}, UserError, "model 'tiny' has no torchvision ResNet"))
    for run, kwargs, error, message in cases:
        with pytest.raises(error, match=message) as err:
            export.export(run, str(out), **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="must be a file name ending in .safetensors"):
        export.export(demo_run, str(tmp_path / "f.pt"))
    with pytest.raises(UserError, match="Cannot write OUT"):  # under a file, not a folder
        export.export(demo_run, os.path.join(demo_run, CONFIG_FILE, "f.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["empty", "tiny"]  # nothing written

    json_path = tmp_path / "f.json"
    json_path.write_text("mine")
    with pytest.raises(UserError, match=f"{json_path} exists: pass --overwrite"):
        export.export(demo_run, str(out))
    assert json_path.read_text() == "mine" and not out.exists()
    export.export(demo_run, str(out), overwrite=True)
    assert json.loads(json_path.read_text())["arch"] == "resnet18" and out.exists()


def test_the_command_line_exports_and_refuses_an_existing_out_in_one_line(
    demo_run, tmp_path, capsys
):
    out = str(tmp_path / "demo.safetensors")
    export.main([demo_run, out, "--head"])  # in-process: what python -m runs
    assert capsys.readouterr().out.startswith(f"Wrote {out} (encoder f of {demo_run}")
    written = open(out, "rb").read()
    again = subprocess.run(
        [sys.executable, "-m", "simclr_jax.export", demo_run, out],
        cwd=REPO,  # the checkout's package first on sys.path
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2
    want = f"error: {out} exists: pass --overwrite to replace it, or choose another OUT."
    assert again.stderr.strip() == want
    assert open(out, "rb").read() == written
