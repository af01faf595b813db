"""A folder packed into array_record (`python -m simclr_jax.data.pack`): the same images, labels and
run as the folder it came from (PNG is lossless), JPEG within its error; the corrupt files
skipped and named; bad input a one-line error that overwrites nothing. A tfds dataset packed
(`--tfds`): its own pixels and labels back, read as a folder run reads a pack."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import cifar_simclr
from simclr_jax.data import catalog, dataset, pack, pack_format, sources
from tests.folder_fixture import write_folder
from tests.helpers import run_cli
from tests.test_folder import FOLDER_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pack_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.data.pack", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(folder, its PNG pack at 16 px, what the fixture wrote)."""
    root = str(tmp_path_factory.mktemp("images"))
    wrote = write_folder(root)
    out = str(tmp_path_factory.mktemp("packs") / "png16")
    done = _pack_cli(root, out, "--canvas", "16", "--threads", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Skipped 2 unreadable file(s) of 22" in done.stderr  # named, as a run names them
    assert "Packed test 9, train 18, unlabelled 20 at 16 px (png)" in done.stdout
    return root, out, wrote


def _data_cfg(data_dir, split="train+unlabelled"):
    c = cifar_simclr.get_config().data
    c.name, c.data_dir, c.image_size, c.pretrain_split = "folder", data_dir, 16, split
    return c


def test_a_png_pack_reads_exactly_the_folders_images_and_labels(packed):
    root, out, wrote = packed
    meta = json.load(open(os.path.join(out, pack_format.PACK_META)))
    assert meta["splits"]["unlabelled"]["skipped"] == sorted(wrote["corrupt"])
    from_folder, from_pack = dataset.load(_data_cfg(root)), dataset.load(_data_cfg(out))
    for role in ("pretrain", "train", "test"):
        a, b = getattr(from_folder, role), getattr(from_pack, role)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(sources.read_all(a), sources.read_all(b))
        assert b.identity()["source"].startswith("pack:")
        assert b.identity()["fingerprint"] != a.identity()["fingerprint"]
    assert from_pack.num_classes == len(wrote["classes"]) == from_folder.num_classes


def test_a_jpeg_pack_is_within_jpegs_error(packed, tmp_path):
    root, _, _ = packed
    out = str(tmp_path / "jpeg")
    done = _pack_cli(root, out, "--canvas", "16", "--encoding", "jpeg", "--splits", "train,test")
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = _data_cfg(out, split="train")
    a = sources.read_all(dataset.load(_data_cfg(root, split="train")).train).astype(np.float64)
    b = sources.read_all(dataset.load(cfg).train).astype(np.float64)
    assert 0 < np.abs(a - b).mean() < 3.0  # grey levels: lossy, but close


def test_pretraining_on_the_pack_gives_the_folders_losses(packed, tmp_path):
    root, out, _ = packed
    losses = {}
    for name, where in (("folder", root), ("pack", out)):
        workdir = str(tmp_path / name)
        flags = [*FOLDER_FLAGS, f"--config.data.data_dir={where}", "--workdir", workdir]
        done = run_cli([*flags, "--mode=pretrain", "--config.data.pretrain_split=train+unlabelled"])
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        losses[name] = [r["loss"] for r in records if r["phase"] == "pretrain"]
    assert len(losses["pack"]) == 2 and losses["pack"] == losses["folder"]


@pytest.mark.parametrize("case", ["out_not_empty", "no_such_dir", "missing_split"])
def test_bad_input_is_a_one_line_error_that_overwrites_nothing(packed, tmp_path, case):
    root, out, _ = packed
    if case == "missing_split":  # the pack has no 'extra' split: a run names the ones it has
        workdir = tmp_path / "run"
        flags = [*FOLDER_FLAGS, f"--config.data.data_dir={out}", "--workdir", str(workdir)]
        done = run_cli([*flags, "--config.data.pretrain_split=extra"], timeout=120)
        message = "has splits ['test', 'train', 'unlabelled'], not 'extra'"
        assert not workdir.exists()
    else:
        target = out if case == "out_not_empty" else str(tmp_path / "new")
        before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
        done = _pack_cli(
            root if case == "out_not_empty" else str(tmp_path / "nope"), target, "--canvas", "16"
        )
        message = "not an empty folder" if case == "out_not_empty" else "is not a folder"
        assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.fixture
def mock_cifar(monkeypatch, tmp_path):
    """tfds' mock CIFAR-10 (12 images a split, from its code), readable without TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def png(self, array):  # smooth pictures (4x4 enlarged): photo-like for JPEG, unlike noise
        small = Image.fromarray(np.asarray(array, np.uint8)).resize((4, 4), Image.NEAREST)
        buf = io.BytesIO()
        small.resize(np.shape(array)[1::-1], Image.BICUBIC).save(buf, format="PNG")
        return buf.getvalue()

    monkeypatch.setattr(tfds.features.Image, "encode_example", png)
    from tensorflow_datasets.core.data_sources import array_record

    one_by_one = lambda self, keys: [self[k] for k in keys]  # noqa: E731 (as in test_folder)
    monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitems__", one_by_one)
    monkeypatch.setattr(catalog, "prepared_builder", lambda name, where: tfds.builder(name))
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        yield str(tmp_path / "tfds")


def _tfds_cfg(name, data_dir):
    c = cifar_simclr.get_config().data
    c.name, c.data_dir, c.pretrain_split = name, data_dir, "train"
    return c


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_a_tfds_pack_gives_back_its_labels_and_pixels(mock_cifar, tmp_path, encoding):
    out = str(tmp_path / "pack")
    how = ["--encoding", "jpeg", "--quality", "90"] if encoding == "jpeg" else []
    args = ["--tfds", "cifar10", "--data-dir", mock_cifar, out, "--splits", "train,test", *how]
    assert pack.main(args) == 0
    meta = pack_format.read_meta(out)
    assert meta["canvas"] == 32 and meta.get("quality") == (90 if encoding == "jpeg" else None)
    raw, packed = (
        dataset.load(_tfds_cfg("cifar10", mock_cifar)),
        dataset.load(_tfds_cfg("folder", out)),
    )
    assert packed.num_classes == raw.num_classes == 10
    assert len(meta["splits"]["train"]["classes"]) == 10  # the label feature's names
    for role in ("train", "test"):
        a, b = getattr(raw, role), getattr(packed, role)
        assert len(b) == 12 and b.identity()["source"].startswith("pack:")
        np.testing.assert_array_equal(a.labels, b.labels)
        want, got = sources.read_all(a), sources.read_all(b)
        assert want.std() > 10  # pictures, not a constant that any encoding keeps
        if encoding == "png":
            np.testing.assert_array_equal(want, got)
        else:
            err = np.abs(want.astype(np.float64) - got)
            assert 0 < err.mean() < 2.0 and err.max() < 40, (err.mean(), err.max())


def test_a_bad_tfds_pack_is_a_one_line_error_that_makes_nothing(mock_cifar, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["--tfds", "cifar10", "--data-dir", mock_cifar, str(out), "--splits", "train"]
    assert pack.main([*args, "--encoding", "jpeg", "--quality", "101"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --quality 101: give a JPEG quality from 1 to 100 (e.g. 95)."]
    assert not out.exists()
    with pytest.raises(SystemExit):  # a folder and --tfds: argparse's usage error
        pack.main(["--tfds", "cifar10", str(tmp_path / "dir"), str(out)])
    assert "give DIR OUT, or --tfds NAME --data-dir DIR OUT" in capsys.readouterr().err
