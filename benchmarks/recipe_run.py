"""The CIFAR-10 recipe on an accelerator in one call: pretrain for as many epochs as fit in a time
budget, then evaluate the frozen encoder with every train label (linear probe and kNN), and
write the results to benchmarks/results/<device>-<dataset>-<model>-<precision>-recipe.json.

  # one H100 / H200 (bf16, the recipe's ResNet-18 and batch 512), under 9 minutes in all:
  python benchmarks/recipe_run.py --data-dir /path/to/tensorflow_datasets --minutes 5
  # all of CIFAR-10 from a pack, kNN curve, fine-tune vs scratch (what gpu_run.sh recipe runs,
  # with the epochs and --pretrain-by of benchmarks/gpu_plan.py):
  python benchmarks/recipe_run.py --set data.name=folder --data-dir .devdata/cifar10_pack \
      --epochs N --knn-every 25 --downstream-epochs 10
  # a CPU smoke run of the same path (what tests/test_benchmarks.py runs):
  python benchmarks/recipe_run.py --config configs/digits_simclr.py --minutes 0.05 \
      --set model.name=tiny --set pretrain.batch_size=64 --precision float32

Steps: (1) load the data and its channel statistics; (2) time a few pretraining steps after
compiling, fed as the run feeds them (`pretrain.batches`; images/s): with --epochs the run's own
program, which the run then loads from the compilation cache; (3) epochs = budget * images/s /
pretraining images (at least 1), or --epochs, fewer if --pretrain-by would be missed at the timed
rate (gpu_run's plan; then one more compile), warm-up a tenth of them; (4) pretrain
(`pretrain.run` on the loaded data, the kNN monitor every --knn-every epochs); then, by value,
(5) features of every train and test image, the linear probe (L-BFGS, penalty by
cross-validation) and the weighted kNN; (6) with --downstream-epochs, fine-tune vs scratch on
every train label; (7) the same kNN of the model at step 0; (8) pretrain.png. The JSON is written
before (2) and again after every part; a part after (4) that fails is recorded under 'errors'
and the next one runs.

The data: a prepared tfds copy (`--data-dir`), a pack (`python -m simclr_jax.data.pack`, read with
`--set data.name=folder --data-dir PACK`), or an .npz made by `--pack` on a machine that
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
import traceback

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
    p.add_argument("--epochs", type=int, default=0, help="pretrain this many epochs (0: budget)")
    p.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--timing-steps", type=int, default=5, help="steps timed for images/s")
    p.add_argument("--knn-every", type=int, default=0, help="kNN monitor every N epochs (0: off)")
    p.add_argument(
        "--downstream-epochs",
        type=int,
        default=0,
        help="then fine-tune vs scratch for N epochs on every train label (0: not run)",
    )
    p.add_argument(
        "--pretrain-by",
        type=float,
        default=0.0,
        help="with --epochs: epoch seconds by which pretraining (kNN checks included) must end; "
        "fewer epochs if the timed rate says it would not (0: no limit)",
    )
    p.add_argument(
        "--rate-factor",
        type=float,
        default=1.0,
        help="with --pretrain-by: the run's rate over the timed steps' (the streamed path's)",
    )
    p.add_argument("--knn-check-s", type=float, default=0.0, help="with --pretrain-by: s a check")
    p.add_argument("--out-name", default="", help="the JSON's file name (default: by device)")
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
    from simclr_jax.data import dataset

    if not args.npz:
        return dataset.load(config.data)
    import numpy as np

    from simclr_jax.data import sources

    with np.load(args.npz) as f:
        arrays = {k: f[k] for k in f.files}
    name = os.path.basename(args.npz)
    train = sources.ArraySource(arrays["train_images"], arrays["train_labels"], f"{name}/train")
    test = sources.ArraySource(arrays["test_images"], arrays["test_labels"], f"{name}/test")
    num_classes = int(arrays["train_labels"].max()) + 1
    return dataset.Dataset(config.data.name, train, train, test, num_classes=num_classes)


def pack(config, args) -> None:
    """The config's labelled train split (its first --pack-train images) and test split (first
    --pack-test) written to --pack as uint8 arrays."""
    import numpy as np

    from simclr_jax.data import dataset, sources

    ds = dataset.load(config.data)
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


def images_per_second(config, ds, steps: int, epochs: int = 0) -> tuple[float, float]:
    """(images/s of the pretraining step after compiling, compile seconds): the run's step fed
    as the run feeds it, `pretrain.batches` streaming ds.pretrain's rows to the devices. With
    `epochs` (the run's, known already) it is the run's very program, which the run then loads
    from the compilation cache."""
    import jax

    from simclr_jax.runtime import parallel
    from simclr_jax.stages import pretrain

    pc = config.pretrain
    spe = pretrain.steps_per_epoch(len(ds.pretrain), pc.batch_size)
    # Without `epochs`, the run's own step but for its schedule's length: one compile more.
    p_step, state = pretrain.step_and_initial_state(config, spe, (epochs or 100) * spe)
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


def fitting_epochs(seconds: float, ips: float, images: int, knn_every=0, check_s=0.0) -> int:
    """The most epochs (at least 1) whose steps at `ips` images/s, and the kNN monitor's checks
    (every `knn_every` epochs, `check_s` each), take at most `seconds`."""
    per_epoch = images / ips
    epochs = max(1, int(seconds / per_epoch))
    checks = (lambda e: e // knn_every) if knn_every else (lambda e: 0)
    while epochs > 1 and epochs * per_epoch + checks(epochs) * check_s > seconds:
        epochs -= 1
    return epochs


def planned_epochs(args, ips: float, compile_s: float, images: int, now: float) -> tuple:
    """(epochs, why they differ from --epochs or None): --minutes' worth at the timed rate; or
    --epochs, fewer when --pretrain-by would be missed at the timed rate times --rate-factor (the
    kNN checks counted, and one more compile: a shorter run is another program)."""
    if not args.epochs:
        return fitting_epochs(args.minutes * 60, ips, images), None
    if not args.pretrain_by:
        return args.epochs, None
    rate, left = ips * args.rate_factor, args.pretrain_by - now
    every, check_s = args.knn_every, args.knn_check_s
    if fitting_epochs(left, rate, images, every, check_s) >= args.epochs:
        return args.epochs, None
    epochs = fitting_epochs(left - compile_s, rate, images, every, check_s)
    why = f"{args.epochs} epochs would end after --pretrain-by ({left:.0f} s left at {rate:.0f}/s)"
    return epochs, why


def pretrain_for(config, ds, workdir: str):
    """Pretrains on `ds` itself (an .npz has no tfds name to load again); (state, summary)."""
    from simclr_jax.app import main as pipeline
    from simclr_jax.app import validate as config_lib
    from simclr_jax.runtime.records import MetricWriter
    from simclr_jax.stages import pretrain
    from simclr_jax.train import checkpoint

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
    from simclr_jax.runtime.files import METRICS_FILE, read_records

    return read_records(os.path.join(workdir, METRICS_FILE))


def knn_at_init(config, ds) -> float:
    """The frozen kNN (every train label, k=200, T=0.1) of the same model at step 0: what
    pretraining has to beat."""
    import numpy as np

    from simclr_jax.evaluation import frozen as evaluate
    from simclr_jax.stages import pretrain

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

    from simclr_jax.evaluation import frozen as evaluate
    from simclr_jax.evaluation import linear_probe as probe

    encoder = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
    every = np.arange(len(ds.train))
    t0 = time.perf_counter()
    train_x, test_x = evaluate.frozen_features(config, ds, every, encoder)
    features_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = probe.configured_linear_probe(
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


def fine_tune_vs_scratch(config, ds, state, workdir: str, epochs: int) -> dict:
    """downstream.compare for `epochs` (the short budget only) on the labelled subset
    (downstream.label_fraction, 1.0 = every train label): the classifier fine-tuned from the
    pretrained f against the same classifier from the weights pretraining started from. Returns
    each run's final test accuracy and loss, its per-epoch test accuracies and wall seconds."""
    from simclr_jax.app import main as pipeline
    from simclr_jax.app import validate as config_lib
    from simclr_jax.data import dataset
    from simclr_jax.runtime.records import MetricWriter
    from simclr_jax.stages import downstream

    dc = config.downstream
    dc.epochs, dc.long_epochs = epochs, 0
    dc.checkpoint_every = 10**9  # each run's last step only (not one per test evaluation)
    config_lib.validate(config, "downstream")
    subset = dataset.labelled_subset(
        ds.train_labels, dc.label_fraction, ds.num_classes, config.seed
    )
    encoder = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
    step = int(state.step)
    starts = {
        downstream.FINETUNE: (encoder, {"dir": pipeline.pretrain_dir(workdir), "step": step}),
        downstream.SCRATCH: (
            downstream.random_encoder(config),
            {"init": "the pretraining's initial weights"},
        ),
    }
    writer = MetricWriter(workdir)
    try:
        walls = downstream.compare(config, ds, workdir, writer, subset, starts)
    finally:
        writer.close()
    out = {"epochs": epochs, "num_labelled": len(subset), "batch_size": dc.batch_size}
    records = writer_records(workdir)
    for run in (downstream.FINETUNE, downstream.SCRATCH):
        evals = [r for r in records if r["phase"] == run and r.get("test_acc") is not None]
        out[run] = {
            "test_acc": evals[-1]["test_acc"],
            "test_loss": evals[-1]["test_loss"],
            "test_acc_by_epoch": [[r["epoch"], r["test_acc"]] for r in evals],
            "wall_s": walls[run],
        }
    return out


def knn_curve(workdir: str, steps_per_epoch: int) -> list[list]:
    """[epoch, kNN test accuracy] of the kNN monitor's records (pretrain.knn_every)."""
    records = [r for r in writer_records(workdir) if r["phase"] == "pretrain"]
    return [[r["step"] // steps_per_epoch, r["knn_acc"]] for r in records if "knn_acc" in r]


class Parts:
    """The run's parts after pretraining, each allowed to fail: its error is recorded in the
    result (`errors`), the traceback printed, and the next part runs; the JSON is written again
    after every part, so what was measured survives a later failure or a kill."""

    def __init__(self, result: dict, args, t_start: float):
        self.result, self.args, self.t_start = result, args, t_start
        self.path = write(result, args)

    def mark(self, text: str) -> None:
        print(f"[recipe +{time.perf_counter() - self.t_start:.0f}s] {text}", flush=True)

    def run(self, name: str, fn, *fn_args):
        self.mark(f"{name} ...")
        t0 = time.perf_counter()
        try:
            out = fn(*fn_args)
        except Exception as err:  # noqa: BLE001 (recorded; the next part still runs)
            traceback.print_exc()
            self.result.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
            out = None
        self.result.setdefault("part_wall_s", {})[name] = time.perf_counter() - t0
        self.result["total_wall_s"] = time.perf_counter() - self.t_start
        self.path = write(self.result, self.args)
        self.mark(f"{name} done")
        return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="simclr_recipe_")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "xla_cache"))
    from simclr_jax.runtime import xla

    xla.cpu_convolutions()  # as run.py (XLA:CPU only)
    xla.use_compilation_cache()
    import jax

    from simclr_jax.data import dataset
    from simclr_jax.stages import pretrain

    t_start = time.perf_counter()
    config = load_config(args)
    if args.pack:
        return pack(config, args)
    ds = load_data(config, args)
    config = dataset.with_stats(config, ds)
    result = describe(config, ds, args, jax, workdir)
    result["data_load_s"] = time.perf_counter() - t_start
    parts = Parts(result, args, t_start)
    parts.mark(f"data loaded: {len(ds.pretrain)} pretraining images")

    def set_epochs(epochs: int) -> None:
        config.pretrain.epochs, config.pretrain.num_steps = epochs, 0
        config.pretrain.warmup_epochs = 0.1 * epochs  # a tenth, as the official 10 of 100

    if args.epochs:  # the timed step is then the run's own program, compiled once
        set_epochs(args.epochs)
    ips, compile_s = images_per_second(config, ds, args.timing_steps, args.epochs)
    epochs, cut = planned_epochs(args, ips, compile_s, len(ds.pretrain), time.time())
    set_epochs(epochs)
    config.pretrain.knn_every, config.pretrain.checkpoint_every = args.knn_every, 0
    spe = pretrain.steps_per_epoch(len(ds.pretrain), config.pretrain.batch_size)
    result.update(epochs=epochs, steps_per_epoch=spe, timed_images_per_s=ips)
    result.update(first_compile_s=compile_s, planned_epochs=args.epochs or None, epochs_cut=cut)
    result.update(knn_every=args.knn_every, warmup_epochs=config.pretrain.warmup_epochs)
    parts.mark(f"{ips:.0f} images/s after a {compile_s:.0f} s compile: {epochs} epochs")
    write(result, args)  # a pretraining that is stopped still leaves its plan
    t0 = time.perf_counter()
    try:
        state, summary = pretrain_for(config, ds, workdir)  # nothing after it runs without it
    except BaseException as err:  # a stop (SIGTERM: stops.Interrupted) too; recorded, then raised
        result.setdefault("errors", {})["pretrain"] = f"{type(err).__name__}: {err}"
        result["total_wall_s"] = time.perf_counter() - t_start
        write(result, args)
        raise
    result.update(
        steps=summary["step"],
        images_per_s=summary["images_per_s"],
        pretrain_wall_s=time.perf_counter() - t0,
        final_loss=summary["loss"],
        first_logged_loss=summary["first_logged_loss"],  # the mean of the first log interval
        first_logged_step=summary["first_logged_step"],
        knn_curve=knn_curve(workdir, spe),  # [epoch, acc] of the monitor (k=200, T=0.1)
    )
    parts.mark(f"pretrained {epochs} epochs in {result['pretrain_wall_s']:.0f} s")
    # The parts after pretraining, by value: a run stopped at its deadline loses the last ones.
    frozen = parts.run("frozen_all_labels", frozen_all_labels, config, ds, state)
    result.update(frozen or {})
    if args.downstream_epochs:
        result["fine_tune_vs_scratch"] = parts.run(
            "fine_tune_vs_scratch",
            fine_tune_vs_scratch,
            config,
            ds,
            state,
            workdir,
            args.downstream_epochs,
        )
    result["knn_acc_at_init"] = parts.run("knn_at_init", knn_at_init, config, ds)
    parts.run("pictures", pretrain_picture, config, workdir, ds.num_classes)
    result["total_wall_s"] = time.perf_counter() - t_start
    write(result, args)
    print(
        json.dumps({k: result.get(k) for k in ("epochs", "images_per_s", "knn_acc", "linear_acc")})
    )
    return result


def describe(config, ds, args, jax, workdir: str) -> dict:
    """What the run is: device, data, model and settings (written before any part runs)."""
    return {
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "dataset": config.data.name,
        "data_dir": config.data.data_dir,
        "train_images": len(ds.train),  # counts: the labelled train and test splits
        "test_images": len(ds.test),
        "pretrain_images": len(ds.pretrain),
        "pretrain_source": type(ds.pretrain).__name__,  # an ArraySource: read into memory once
        "model": config.model.name,
        "width": config.model.width,
        "image_size": config.data.image_size,
        "precision": config.precision,
        "global_batch": config.pretrain.batch_size,
        "budget_minutes": args.minutes,
        "workdir": workdir,
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }


def pretrain_picture(config, workdir: str, num_classes: int) -> str:
    """pretrain.png in the workdir (loss, learning rate, kNN monitor against the step)."""
    from simclr_jax.report import pictures

    pictures.write_pretrain_curves(config, workdir, num_classes)
    return os.path.join(workdir, "pretrain.png")


def write(result: dict, args) -> str:
    kind = "".join(c if c.isalnum() else "-" for c in result["device"].lower()).strip("-")
    name = f"{kind}-{result['dataset']}-{result['model']}-{result['precision']}-recipe.json"
    return throughput.save_json(result, args.out, args.out_name or name)


if __name__ == "__main__":
    main()
