"""The CIFAR-10 recipe on an accelerator in one call: pretrain for as many epochs as fit in a time
budget, then evaluate the frozen encoder with every train label (linear probe and kNN), and
write the results to benchmarks/results/<device>-<dataset>-<model>-<precision>-recipe.json.

  # one H100 / H200 (bf16, the recipe's ResNet-18 and batch 512), under 9 minutes in all:
  python benchmarks/recipe_run.py --data-dir /path/to/tensorflow_datasets --minutes 5
  # a CPU smoke run of the same path (what tests/test_benchmarks.py runs):
  python benchmarks/recipe_run.py --config configs/digits_simclr.py --minutes 0.05 \
      --set model.name=tiny --set pretrain.batch_size=64 --precision float32

Steps: (1) load the data and its channel statistics; (2) time a few pretraining steps after
compiling, fed as the run feeds them (`pretrain.batches`; images/s); (3) epochs = budget *
images/s / pretraining images (at least 1), warm-up a tenth of them; (4) pretrain
(`pretrain.run` on the loaded data; the persistent compilation cache makes its compile a cache
hit); (5) features of every train and test image, the linear probe (L-BFGS, penalty by
cross-validation) and the weighted kNN; (6) the JSON.

The data: a prepared tfds copy (`--data-dir`), or an .npz made by `--pack` on a machine that
has one (uint8 arrays train_images, train_labels, test_images, test_labels of the labelled
train and test splits, read back as `sources.ArraySource`s; `--pack-train N` and `--pack-test M`
keep the first N train and M test images, for a machine that can only be sent a smaller file: the
device tool carries 64 MiB, and all of CIFAR-10 is 176 MiB of pixels).
"""

import argparse
import ast
import importlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (imports no jax)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cifar_simclr.py", help="a config file")
    p.add_argument("--data-dir", default="", help="tfds data_dir (config.data.data_dir)")
    p.add_argument("--npz", default="", help="read the data from this .npz (see --pack)")
    p.add_argument("--pack", default="", help="write the config's data to this .npz and stop")
    p.add_argument("--pack-train", type=int, default=0, help="with --pack: first N train images")
    p.add_argument("--pack-test", type=int, default=0, help="with --pack: first N test images")
    p.add_argument("--minutes", type=float, default=5.0, help="pretraining time budget")
    p.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--timing-steps", type=int, default=5, help="steps timed for images/s")
    p.add_argument("--workdir", default="", help="default: a fresh temporary directory")
    p.add_argument("--out", default=throughput.RESULTS, help="directory of the JSON result")
    return p.parse_args(argv)


def load_config(args):
    path = os.path.abspath(args.config)
    sys.path.insert(0, os.path.dirname(path))
    config = importlib.import_module(os.path.splitext(os.path.basename(path))[0]).get_config()
    config.precision = args.precision
    if args.data_dir:
        config.data.data_dir = args.data_dir
    for item in args.set:
        key, value = item.split("=", 1)
        node, *path_ = [config, *key.split(".")]
        for part in path_[:-1]:
            node = node[part]
        try:
            node[path_[-1]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[path_[-1]] = value
    return config


def load_data(config, args):
    """The config's dataset (`data.load`), or the .npz of --npz as in-memory sources: its train
    arrays pretrained on and the evaluations' labelled train split, its test arrays the test."""
    from simclr_jax import data

    if not args.npz:
        return data.load(config.data)
    import numpy as np

    from simclr_jax import sources

    with np.load(args.npz) as f:
        arrays = {k: f[k] for k in f.files}
    name = os.path.basename(args.npz)
    train = sources.ArraySource(arrays["train_images"], arrays["train_labels"], f"{name}/train")
    test = sources.ArraySource(arrays["test_images"], arrays["test_labels"], f"{name}/test")
    num_classes = int(arrays["train_labels"].max()) + 1
    return data.Dataset(config.data.name, train, train, test, num_classes=num_classes)


def pack(config, args) -> None:
    """The config's labelled train split (its first --pack-train images) and test split (first
    --pack-test) written to --pack as uint8 arrays."""
    import numpy as np

    from simclr_jax import data, sources

    ds = data.load(config.data)
    n = min(args.pack_train or len(ds.train), len(ds.train))
    m = min(args.pack_test or len(ds.test), len(ds.test))
    np.savez_compressed(
        args.pack,
        train_images=sources.read_all(sources.Take(ds.train, n)),
        train_labels=ds.train_labels[:n],
        test_images=sources.read_all(sources.Take(ds.test, m)),
        test_labels=ds.test_labels[:m],
    )
    size = os.path.getsize(args.pack) / 2**20
    print(f"wrote {args.pack} ({size:.1f} MiB, {n} train images, {m} test images)")


def images_per_second(config, ds, steps: int) -> tuple[float, float]:
    """(images/s of the pretraining step after compiling, compile seconds): the run's step fed
    as the run feeds it, `pretrain.batches` streaming ds.pretrain's rows to the devices."""
    import jax

    from simclr_jax import parallel, pretrain

    pc = config.pretrain
    spe = pretrain.steps_per_epoch(len(ds.pretrain), pc.batch_size)
    # The run's own step but for its schedule's length (not known yet): one compile more.
    p_step, state = pretrain.step_and_initial_state(config, spe, 100 * spe)
    state = parallel.replicate(state)
    inputs = pretrain.batches(config, ds.pretrain, 0, steps + 1)
    t0 = time.perf_counter()
    state, metrics = p_step(state, *next(inputs))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step_args in inputs:  # the remaining `steps` steps
        state, metrics = p_step(state, *step_args)
    jax.block_until_ready(metrics)
    return steps * pc.batch_size / (time.perf_counter() - t0), compile_s


def pretrain_for(config, ds, workdir: str):
    """Pretrains on `ds` itself (an .npz has no tfds name to load again); (state, summary)."""
    from simclr_jax import checkpoint, pipeline, pretrain
    from simclr_jax import config as config_lib
    from simclr_jax.metrics import MetricWriter

    config_lib.validate(config, "pretrain")
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(pipeline.pretrain_dir(workdir), keep=1)
    writer = MetricWriter(workdir)
    try:
        state, result = pretrain.run(config, ds, writer, ckpt)
    finally:
        ckpt.close()
        writer.close()
    summary = {"wall_s": result.wall_s, "images_per_s": result.images_per_s, **result.last_record}
    first = [r for r in writer_records(workdir) if r["phase"] == "pretrain"][0]
    summary["first_logged_loss"], summary["first_logged_step"] = first["loss"], first["step"]
    return state, summary


def writer_records(workdir: str) -> list[dict]:
    from simclr_jax.metrics import METRICS_FILE, read_records

    return read_records(os.path.join(workdir, METRICS_FILE))


def knn_at_init(config, ds) -> float:
    """The frozen kNN (every train label, k=200, T=0.1) of the same model at step 0: what
    pretraining has to beat."""
    import numpy as np

    from simclr_jax import evaluate, pretrain

    _, state = pretrain.step_and_initial_state(config, 1, 1)
    encoder = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
    every = np.arange(len(ds.train))
    train_x, test_x = evaluate.frozen_features(config, ds, every, encoder)
    return evaluate.knn_accuracy(
        train_x, ds.train_labels, test_x, ds.test_labels, ds.num_classes, 200, 0.1
    )


def frozen_all_labels(config, ds, state) -> dict:
    """Linear probe and kNN of the frozen encoder, every train label, scored on the test split."""
    import numpy as np

    from simclr_jax import evaluate

    encoder = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
    every = np.arange(len(ds.train))
    t0 = time.perf_counter()
    train_x, test_x = evaluate.frozen_features(config, ds, every, encoder)
    features_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = evaluate.configured_linear_probe(
        config, train_x, ds.train_labels, test_x, ds.test_labels, ds.num_classes
    )
    probe_s = time.perf_counter() - t0
    knn = evaluate.knn_accuracy(
        train_x, ds.train_labels, test_x, ds.test_labels, ds.num_classes, 200, 0.1
    )
    return {
        "linear_acc": probe["test_acc"],
        "linear_l2": probe["l2"],
        "knn_acc": knn,
        "knn_k": 200,
        "knn_temperature": 0.1,
        "features_s": features_s,
        "linear_probe_s": probe_s,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="simclr_recipe_")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "xla_cache"))
    from simclr_jax import xla_env

    xla_env.cpu_convolutions()  # as run.py (XLA:CPU only)
    xla_env.use_compilation_cache()
    import jax

    from simclr_jax import data

    t_start = time.perf_counter()
    config = load_config(args)
    if args.pack:
        return pack(config, args)
    ds = load_data(config, args)
    config = data.with_stats(config, ds)
    ips, compile_s = images_per_second(config, ds, args.timing_steps)
    epochs = max(1, int(args.minutes * 60 * ips / len(ds.pretrain)))
    config.pretrain.epochs, config.pretrain.num_steps = epochs, 0
    config.pretrain.warmup_epochs = max(1.0, round(0.1 * epochs))
    config.pretrain.knn_every, config.pretrain.checkpoint_every = 0, 0
    print(f"{ips:.0f} images/s after a {compile_s:.0f} s compile: {epochs} epochs", flush=True)
    t0 = time.perf_counter()
    state, summary = pretrain_for(config, ds, workdir)
    pretrain_s = time.perf_counter() - t0
    result = {
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "dataset": config.data.name,
        "train_images": len(ds.train),  # counts: the labelled train and test splits
        "test_images": len(ds.test),
        "pretrain_images": len(ds.pretrain),
        "model": config.model.name,
        "width": config.model.width,
        "image_size": config.data.image_size,
        "precision": config.precision,
        "global_batch": config.pretrain.batch_size,
        "budget_minutes": args.minutes,
        "epochs": epochs,
        "steps": summary["step"],
        "timed_images_per_s": ips,
        "images_per_s": summary["images_per_s"],
        "first_compile_s": compile_s,
        "pretrain_wall_s": pretrain_s,
        "final_loss": summary["loss"],
        "first_logged_loss": summary["first_logged_loss"],  # the mean of the first log interval
        "first_logged_step": summary["first_logged_step"],
        **frozen_all_labels(config, ds, state),
        "knn_acc_at_init": knn_at_init(config, ds),
        "total_wall_s": time.perf_counter() - t_start,
        "workdir": workdir,
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }
    write(result, args.out)
    return result


def write(result: dict, out: str) -> str:
    kind = "".join(c if c.isalnum() else "-" for c in result["device"].lower()).strip("-")
    name = f"{kind}-{result['dataset']}-{result['model']}-{result['precision']}-recipe.json"
    print(json.dumps({k: result[k] for k in ("epochs", "images_per_s", "knn_acc", "linear_acc")}))
    return throughput.save_json(result, out, name)


if __name__ == "__main__":
    main()
