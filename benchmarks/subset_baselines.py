"""The baselines of a recipe_run result, on its own labelled images and test split: chance, raw
pixels (the project's linear probe, scikit-learn's default LogisticRegression, the weighted kNN)
and the same network at its initialisation, frozen (linear probe, kNN). The frozen encoder's
probes are the ones recipe_run.frozen_all_labels fits (every train label, same settings).

  python benchmarks/subset_baselines.py --npz .devdata/cifar_pack.npz --precision bfloat16
  nice -n 10 python benchmarks/subset_baselines.py --set data.name=folder \
      --set data.data_dir=.devdata/cifar10_pack --tag cpu-cifar10-full-baselines  # docs/gpu.md
Results: results/<tag>.json, written after the pixel stage and again after the random-init one.
Slow on a CPU on the full split (the probe on 50,000 x 3,072 pixels, the random encoder's
features of 60,000 images: hours on a shared 2-vCPU machine).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recipe_run  # noqa: E402
import throughput  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", default="", help="recipe_run's .npz ('': the config's data, --set)")
    p.add_argument("--config", default="configs/cifar_simclr.py")
    p.add_argument("--precision", default="bfloat16")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default=throughput.RESULTS)
    p.add_argument("--tag", default="cifar-subset-baselines")
    p.add_argument(
        "--stages",
        default="pixels,random",
        help="pixels (linear probe, scikit-learn, kNN on raw pixels), random (the network at "
        "its initialisation); one process each runs them side by side",
    )
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    rargs = recipe_run.parse_args(["--npz", args.npz, "--config", args.config,
                                   "--precision", args.precision] + sum((["--set", s] for s in args.set), []))  # fmt: skip
    from sklearn.linear_model import LogisticRegression

    from simclr_jax.data import dataset
    from simclr_jax.evaluation import frozen, linear_probe
    from simclr_jax.stages import downstream

    config = recipe_run.load_config(rargs)
    ds = recipe_run.load_data(config, rargs)
    config = dataset.with_stats(config, ds)
    every = np.arange(len(ds.train))
    y, ty, k = ds.train_labels, ds.test_labels, ds.num_classes
    out = {"train_images": len(ds.train), "test_images": len(ds.test), "chance": 1.0 / k}
    out["command"] = " ".join(["subset_baselines.py", *(argv or sys.argv[1:])])

    def save(stage: str) -> None:
        """Prints the figures so far and writes the JSON after each stage: on all of CIFAR-10
        a stage takes tens of minutes here, and a stopped run keeps what it measured."""
        print(f"{stage}: {out}", flush=True)
        throughput.save_json(out, args.out, f"{args.tag}.json")

    if "pixels" in stages:
        t0 = time.perf_counter()
        px, tpx = downstream.pixel_features(config, ds, every)
        out["pixels_linear_probe"] = linear_probe.configured_linear_probe(
            config, px, y, tpx, ty, k
        )["test_acc"]
        sk = LogisticRegression(max_iter=1000).fit(px, y)  # scikit-learn's defaults, in [0, 1]
        out["pixels_sklearn_default_logreg"] = float(np.mean(sk.predict(tpx) == ty))
        out["pixels_knn"] = frozen.knn_accuracy(px, y, tpx, ty, k, 200, 0.1)
        out["pixels_s"] = time.perf_counter() - t0
        save("pixels")
    if "random" in stages:
        t0 = time.perf_counter()
        rx, trx = frozen.frozen_features(config, ds, every, downstream.random_encoder(config))
        out["random_init_linear_probe"] = linear_probe.configured_linear_probe(
            config, rx, y, trx, ty, k
        )["test_acc"]
        out["random_init_knn"] = frozen.knn_accuracy(rx, y, trx, ty, k, 200, 0.1)
        out["random_s"] = time.perf_counter() - t0
        save("random-init encoder")
    return out


if __name__ == "__main__":
    main()
