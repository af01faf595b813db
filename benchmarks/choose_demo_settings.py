"""The digits demo's settings chosen on validation data (issue #17 item 4), never on test numbers.

Every run holds out 20% of the digits train split (`data.validation_fraction=0.2`, the same
images whatever the seed: kept out of pretraining and of the labelled images) and is scored on it;
the test split is not read. Two choices, each over seeds 0 and 1:

  1. pretraining epochs in --epochs (default 48, 96, 160): the mean over seeds of the frozen
     encoder's validation linear-probe and kNN accuracies (their average) picks;
  2. the classifiers' learning rate in --lrs (default 0.003, 0.01, 0.03, 0.1), fine-tuning the encoder
     of the chosen epochs (--mode=downstream): the mean validation accuracy of the fine-tuned
     classifier after its 10 epochs picks.

  python benchmarks/choose_demo_settings.py --out benchmarks/results/digits_settings

Writes OUT/choices.json and OUT/choices.md (every run's validation numbers and the picks).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = [
    "--config",
    "configs/digits_simclr.py",
    "--config.data.validation_fraction=0.2",
    "--config.downstream.long_epochs=0",
]


def _run(workdir: str, flags: list[str]) -> dict:
    """run.py in a subprocess; its report.json's frozen and classifier numbers."""
    if not os.path.exists(os.path.join(workdir, "report.json")):
        cmd = [sys.executable, "run.py", *BASE, *flags, "--workdir", workdir]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rep = json.load(open(os.path.join(workdir, "report.json")))
    return {
        "linear": rep["linear"]["test_acc"],
        "knn": rep["knn"]["test_acc"],
        "finetune": rep["finetune"]["final_test_acc"],
        "scratch": rep["scratch"]["final_test_acc"],
        "num_validation": rep["num_test"],
        "num_labelled": rep["num_labelled"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "digits_settings"))
    p.add_argument("--workdirs", default="/tmp/digits_settings")
    p.add_argument("--epochs", default="48,96,160")
    p.add_argument("--lrs", default="0.003,0.01,0.03,0.1")
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, lines = {"epochs": {}, "lr": {}}, []

    def row(kind, value, seed, r):
        runs[kind].setdefault(value, {})[seed] = r
        print(kind, value, "seed", seed, r, flush=True)

    for epochs in [int(e) for e in args.epochs.split(",")]:
        for seed in seeds:
            wd = os.path.join(args.workdirs, f"e{epochs}_s{seed}")
            flags = [f"--config.pretrain.epochs={epochs}", f"--config.seed={seed}"]
            row("epochs", epochs, seed, _run(wd, flags))

    def frozen(value):
        rs = runs["epochs"][value].values()
        return statistics.mean((r["linear"] + r["knn"]) / 2 for r in rs)

    best_epochs = max(runs["epochs"], key=frozen)
    for lr in [float(v) for v in args.lrs.split(",")]:
        for seed in seeds:
            source = os.path.join(args.workdirs, f"e{best_epochs}_s{seed}")
            wd = os.path.join(args.workdirs, f"e{best_epochs}_s{seed}_lr{lr:g}")
            flags = [
                "--mode=downstream",
                f"--config.restore={source}",
                f"--config.pretrain.epochs={best_epochs}",
                f"--config.seed={seed}",
                f"--config.downstream.learning_rate={lr}",
            ]
            row("lr", lr, seed, _run(wd, flags))

    def finetuned(value):
        return statistics.mean(r["finetune"] for r in runs["lr"][value].values())

    best_lr = max(runs["lr"], key=finetuned)
    lines += [
        "# The digits demo's settings, chosen on validation data",
        "",
        f"`python benchmarks/choose_demo_settings.py` ({' '.join(BASE[2:])}; seeds {seeds}): "
        f"every number is a **validation** accuracy (20% of the train split held out), never a "
        f"test one.",
        "",
        "| pretraining epochs | seed | linear probe | kNN | fine-tuned (10 ep.) | scratch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for value, by_seed in runs["epochs"].items():
        for seed, r in by_seed.items():
            lines.append(
                f"| {value} | {seed} | {r['linear']:.2%} | {r['knn']:.2%} | {r['finetune']:.2%} "
                f"| {r['scratch']:.2%} |"
            )
    lines += ["", f"Picked: **{best_epochs} epochs** (best mean of linear and kNN).", ""]
    lines += ["| classifier lr | seed | fine-tuned (10 ep.) | scratch |", "|---:|---:|---:|---:|"]
    for value, by_seed in runs["lr"].items():
        for seed, r in by_seed.items():
            lines.append(f"| {value:g} | {seed} | {r['finetune']:.2%} | {r['scratch']:.2%} |")
    lines += ["", f"Picked: **lr {best_lr:g}** (best mean fine-tuned accuracy).", ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "choices.json"), "w") as f:
        json.dump({"runs": runs, "epochs": best_epochs, "lr": best_lr}, f, indent=1)
    with open(os.path.join(args.out, "choices.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
