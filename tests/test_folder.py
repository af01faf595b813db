"""Your own images: an image folder (mixed sizes and modes, a few corrupt files) pretrains,
evaluates and reports end to end; unlabelled splits feed pretraining only; bad folders are one-line
errors before any work; a checkpoint made on other data is not resumed; the ImageNet recipe runs
on an ImageNet-shaped folder; STL-10's unlabelled split through tfds (mock data)."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from simclr_jax.data import catalog as splits
from simclr_jax.data import dataset, sources
from tests.folder_fixture import write_folder
from tests.helpers import run_cli

# Any recipe shrunk to seconds: a tiny network, batches of 8, one short classifier run.
SHRINK = [
    "--config.data.name=folder",
    "--config.model.name=tiny",
    "--config.pretrain.batch_size=8",
    "--config.downstream.batch_size=8",
    "--config.downstream.epochs=1",
    "--config.downstream.long_epochs=0",
    "--config.downstream.knn_k=5",
    "--config.downstream.linear_l2_grid=(0.01,)",
    "--config.downstream.linear_iters=20",
    "--config.downstream.linear_folds=0",
]
# The CIFAR recipe shrunk: what a user runs on a folder.
FOLDER_FLAGS = [
    "--config",
    "configs/cifar_simclr.py",
    *SHRINK,
    "--config.data.image_size=16",
    "--config.pretrain.num_steps=4",
    "--config.pretrain.log_every=2",
    "--config.pretrain.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("images"))
    return root, write_folder(root)


def test_a_folder_of_mixed_files_pretrains_evaluates_and_reports(folder, tmp_path):
    root, wrote = folder
    workdir = str(tmp_path / "run")
    flags = [*FOLDER_FLAGS, f"--config.data.data_dir={root}"]
    out = run_cli([*flags, "--workdir", workdir, "--config.data.pretrain_split=train+unlabelled"])
    assert out.returncode == 0, out.stderr[-3000:]
    # The two corrupt files were counted and named once; the run went on without them.
    assert out.stderr.count("Skipped 2 unreadable file(s) of 22") == 1, out.stderr[-3000:]
    for bad in wrote["corrupt"]:
        assert bad in out.stderr
    n_pretrain = 3 * 6 + wrote["unlabelled"]
    assert f"Loaded folder: {n_pretrain} pretraining (train+unlabelled)" in out.stderr
    assert os.path.exists(os.path.join(workdir, "report.md"))
    # Images without labels: the online linear head is off by default, and both say why.
    why = f"{wrote['unlabelled']} of the {n_pretrain} pretraining images (data.pretrain_split="
    assert f"online linear head (pretrain.online_probe) is off: {why}" in out.stderr
    assert f"Online linear head: off ({why}" in open(os.path.join(workdir, "report.md")).read()
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["phase"] == "pretrain"] == [2, 4]
    linear = [r for r in records if r["phase"] == "linear"][0]
    assert linear["num_labelled"] == 18 and linear["num_test"] == 9  # labelled splits only
    config = json.load(open(os.path.join(workdir, "config.json")))
    ident = config["data"]["identity"]
    assert ident["pretrain"]["num_examples"] == n_pretrain
    assert ident["train"]["source"] == "folder:" + os.path.join(root, "train")


def test_the_online_probe_on_unlabelled_images_is_an_error_before_any_work(folder, tmp_path):
    """pretrain.online_probe=True where pretraining reads images without labels: a ConfigError
    (run.py: one line, exit 2) once the data is loaded, before the workdir exists."""
    from simclr_jax.app import main
    from simclr_jax.errors import ConfigError
    from tests.helpers import tiny_config

    root, wrote = folder
    config = tiny_config(
        **{"data.name": "folder", "data.data_dir": root, "pretrain.batch_size": 8},
        **{"data.pretrain_split": "train+unlabelled", "pretrain.online_probe": True},
    )
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"config.pretrain.online_probe=True, but \d+ of the"):
        main.run(config, str(workdir), "pretrain")
    assert not workdir.exists()


def test_resuming_on_other_data_stops_with_a_clear_message(tmp_path):
    root = str(tmp_path / "images")
    write_folder(root, corrupt=0)
    workdir = str(tmp_path / "run")
    flags = [*FOLDER_FLAGS, f"--config.data.data_dir={root}", "--workdir", workdir]
    out = run_cli([*flags, "--mode=pretrain", "--config.pretrain.num_steps=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    Image.new("RGB", (20, 20), (1, 2, 3)).save(os.path.join(root, "train", "cat", "new.png"))
    views = open(os.path.join(workdir, "views.png"), "rb").read()
    out = run_cli([*flags, "--mode=pretrain", "--config.pretrain.num_steps=2"])  # the same command
    assert out.returncode == 2, out.stderr[-3000:]
    assert "trained on other data" in out.stderr and "train" in out.stderr
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints", "pretrain")))
    assert steps == ["2"]  # nothing written over
    assert open(os.path.join(workdir, "views.png"), "rb").read() == views  # not even the views


@pytest.mark.parametrize(
    "layout, flag, message",
    [
        (None, "", "does not exist"),
        ("empty_train", "", "train"),
        ("no_unlabelled", "--config.data.pretrain_split=unlabelled", "unlabelled"),
        ("corrupt", "--config.data.max_bad_fraction=0.05", "bad_000_truncated.jpg"),
    ],
)
def test_a_bad_folder_is_a_one_line_error_before_any_work(tmp_path, layout, flag, message):
    root = tmp_path / "images"
    if layout == "empty_train":
        (root / "train").mkdir(parents=True)
        (root / "test" / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "test" / "a" / "x.png")
    elif layout == "no_unlabelled":
        write_folder(str(root), unlabelled=0, corrupt=0)
    elif layout == "corrupt":  # 2 of 22 unlabelled files: over a 5% limit
        write_folder(str(root))
        flag = f"{flag} --config.data.pretrain_split=unlabelled"
    workdir = tmp_path / "run"
    args = [*FOLDER_FLAGS, f"--config.data.data_dir={root}", "--workdir", str(workdir)]
    out = run_cli([*args, *flag.split()], timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and str(root) in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


def _imagenet_folder(root, classes=("n01440764", "n01443537"), per_class=8, test_per_class=3):
    """ImageNet's layout and file kind: <split>/<wnid>/<name>.JPEG, photographs of varied size."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("validation", test_per_class)):
        for c, wnid in enumerate(classes):
            os.makedirs(os.path.join(root, split, wnid))
            for i in range(n):
                w, h = int(rng.integers(180, 420)), int(rng.integers(160, 380))
                base = np.full((h, w, 3), 60 + 120 * c, np.float64)
                pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                path = os.path.join(root, split, wnid, f"{wnid}_{i}.JPEG")
                Image.fromarray(pixels).save(path, format="JPEG", quality=85)


def test_the_imagenet_recipe_runs_end_to_end_on_an_imagenet_shaped_folder(tmp_path):
    root = str(tmp_path / "imagenet")
    _imagenet_folder(root)
    workdir = str(tmp_path / "run")
    flags = [
        "--config",
        "configs/imagenet_simclr.py",
        "--workdir",
        workdir,
        f"--config.data.data_dir={root}",
        *SHRINK,  # the recipe as it is but the network and the sizes
        "--config.precision=float32",
        "--config.pretrain.num_steps=2",
        "--config.pretrain.log_every=1",
        "--config.pretrain.knn_every=0",
        "--config.downstream.label_fraction=1.0",
    ]
    out = run_cli(flags, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["data"]["image_size"] == 224 and config["data"]["canvas"] == 256
    assert config["augment"]["blur_prob"] == 0.5 and config["pretrain"]["temperature"] == 0.1
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["phase"] == "pretrain"] == [1, 2]
    assert os.path.exists(os.path.join(workdir, "report.md"))


def test_stl10_pretrains_on_its_unlabelled_split(tmp_path, monkeypatch):
    """tfds' mock data for STL-10 (train, test, unlabelled): the pretraining source is the
    unlabelled split (or train+unlabelled); the labelled roles read train and test."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def png(self, array):  # the mock encodes its random images with TensorFlow; PIL does here
        buf = io.BytesIO()
        Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    monkeypatch.setattr(tfds.features.Image, "encode_example", png)
    # The mock's reader takes one key at a time (its batched read has a signature bug).
    from tensorflow_datasets.core.data_sources import array_record

    one_by_one = lambda self, keys: [self[k] for k in keys]  # noqa: E731
    monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitems__", one_by_one)
    monkeypatch.setattr(splits, "prepared_builder", lambda name, where: tfds.builder(name))
    from configs import cifar_simclr

    c = cifar_simclr.get_config().data
    c.name, c.data_dir, c.image_size = "stl10", str(tmp_path), 32
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        for split, want in (("unlabelled", 24), ("train+unlabelled", 48)):
            c.pretrain_split = split
            ds = dataset.load(c)
            assert len(ds.pretrain) == want and ds.pretrain.canvas == 96  # STL-10's own size
            assert ds.pretrain.name.endswith("stl10/unlabelled")  # joined after train
            assert ds.train.name == "tfds:stl10/train" and ds.test.name == "tfds:stl10/test"
            assert ds.num_classes == 10
            images = sources.read_all(ds.pretrain)
            assert images.shape == (want, 96, 96, 3) and images.dtype == np.uint8

    # Real STL-10's unlabelled rows have label -1 (the mock draws labels for every split): an
    # unlabelled split cannot be a labelled role, shown here on a folder's loose images.
    write_folder(str(tmp_path / "f"), corrupt=0)
    c.name, c.data_dir, c.pretrain_split, c.train_split = (
        "folder",
        str(tmp_path / "f"),
        "train",
        "unlabelled",
    )
    with pytest.raises(dataset.DataError, match="train_split='unlabelled'.* is unlabelled"):
        dataset.load(c)


def test_tfds_labels_are_read_once_then_from_the_cache_until_the_files_change(tmp_path):
    """A split's labels come from every record the first time, then from the label cache; a
    rewritten file (another size or mtime) is read again."""
    import types

    shard = tmp_path / "toy-train.array_record-00000-of-00001"
    shard.write_bytes(b"x" * 10)
    reads = []

    class Toy:  # what TfdsSource asks of tfds.data_source
        split = "train"
        dataset_info = types.SimpleNamespace(
            splits={"train": types.SimpleNamespace(filepaths=[str(shard)])}
        )

        def __len__(self):
            return 5

        def __getitems__(self, keys):
            reads.extend(keys)
            return [{"label": k % 3, "image": b""} for k in keys]

    cache = str(tmp_path / "cache")
    first = sources._tfds_labels(Toy(), "toy-1.0.0-train", cache)
    assert first.tolist() == [0, 1, 2, 0, 1] and len(reads) == 5
    second = sources._tfds_labels(Toy(), "toy-1.0.0-train", cache)
    assert second.tolist() == first.tolist() and len(reads) == 5  # nothing read again
    shard.write_bytes(b"y" * 11)  # the split's file changed
    sources._tfds_labels(Toy(), "toy-1.0.0-train", cache)
    assert len(reads) == 10
