"""The digits demo's settings chosen on validation data (issues #17 and #25), never on test numbers.

Every run holds out 20% of the digits train split (`data.validation_fraction=0.2`, the same
images whatever the seed: kept out of pretraining and of the labelled images) and is scored on it;
the test split is not read. Two choices, each over seeds 0 and 1:

  1. pretraining epochs in --epochs (default 48, 96, 160): the mean over seeds of the frozen
     encoder's validation linear-probe and kNN accuracies (their average) picks;
  2. each classifier run's own learning rate in --lrs (default 0.003 to 0.3), on the
     encoder of the chosen epochs (--mode=downstream), at both budgets (10 epochs and
     --long-epochs, default 200, the demo's): every run of the grid trains all four classifiers
     (fine-tuned and scratch, short and long) at that rate, and for each of them the rate with
     the best mean validation accuracy over seeds at its last epoch picks (a tie: the smaller
     rate). The same grid, budgets and seeds for every classifier. (0.3 joined the grid after
     the first search, 0.003 to 0.1, put both scratch picks at 0.1, its edge.)

  python benchmarks/choose_demo_settings.py --out benchmarks/results/digits_settings

--earlier FILE reuses an earlier search's pretraining rows (what they cost is the search's bulk).
Writes OUT/choices.json and OUT/choices.md (every run's validation numbers and the picks). The
picks go into configs/digits_simclr.py (downstream.runs.<run>.learning_rate) by hand.
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
CLASSIFIERS = ("finetune", "scratch", "finetune_long", "scratch_long")  # downstream.runs


def _run(workdir: str, flags: list[str]) -> dict:
    """run.py in a subprocess; its report.json's frozen and classifier numbers."""
    if not os.path.exists(os.path.join(workdir, "report.json")):
        cmd = [sys.executable, "run.py", *BASE, *flags, "--workdir", workdir]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rep = json.load(open(os.path.join(workdir, "report.json")))
    out = {"linear": rep["linear"]["test_acc"], "knn": rep["knn"]["test_acc"]}
    for run in CLASSIFIERS:
        if rep[run]["final_test_acc"] is not None:
            out[run] = rep[run]["final_test_acc"]
    return {**out, "num_validation": rep["num_test"], "num_labelled": rep["num_labelled"]}


def _lr_flags(lr: float) -> list[str]:
    """Every classifier run at `lr` (each run's own rate overrides the shared one)."""
    runs = [f"--config.downstream.runs.{run}.learning_rate={lr}" for run in CLASSIFIERS]
    return [f"--config.downstream.learning_rate={lr}", *runs]


def _markdown(runs: dict, seeds, best_epochs: int, best_lr: dict, long_epochs: int) -> list[str]:
    lines = [
        "# The digits demo's settings, chosen on validation data",
        "",
        f"`python benchmarks/choose_demo_settings.py` ({' '.join(BASE[2:])}; seeds {seeds}): "
        f"every number is a **validation** accuracy (20% of the train split held out), never a "
        f"test one.",
        "",
        "| pretraining epochs | seed | linear probe | kNN |",
        "|---:|---:|---:|---:|",
    ]
    for value, by_seed in runs["epochs"].items():
        for seed, r in by_seed.items():
            earlier = " (earlier search)" if r.get("earlier") else ""
            lines.append(f"| {value} | {seed}{earlier} | {r['linear']:.2%} | {r['knn']:.2%} |")
    if any(r.get("earlier") for s in runs["epochs"].values() for r in s.values()):
        lines += ["", "(earlier search): the rows of the earlier choices.json given as --earlier."]
    lines += ["", f"Picked: **{best_epochs} epochs** (best mean of linear and kNN).", ""]
    lines += [
        f"Each classifier's learning rate, on the encoder of {best_epochs} epochs "
        f"(`--mode=downstream --config.downstream.long_epochs={long_epochs}`, every run at the "
        f"row's rate):",
        "",
        f"| classifier lr | seed | fine-tuned (10 ep.) | scratch (10 ep.) | fine-tuned "
        f"({long_epochs} ep.) | scratch ({long_epochs} ep.) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for value, by_seed in runs["lr"].items():
        for seed, r in by_seed.items():
            cells = " | ".join(f"{r[run]:.2%}" for run in CLASSIFIERS)
            lines.append(f"| {value:g} | {seed} | {cells} |")
    mean = {
        run: {lr: statistics.mean(r[run] for r in s.values()) for lr, s in runs["lr"].items()}
        for run in CLASSIFIERS
    }
    lines += ["", "Mean over seeds, and the picks (best mean; a tie: the smaller rate):", ""]
    lines += ["| classifier | " + " | ".join(f"lr {lr:g}" for lr in runs["lr"]) + " | picked |"]
    lines += ["|---|" + "---:|" * (len(runs["lr"]) + 1)]
    edges = (min(runs["lr"]), max(runs["lr"]))
    for run in CLASSIFIERS:
        cells = " | ".join(f"{m:.2%}" for m in mean[run].values())
        edge = " (the grid's edge)" if best_lr[run] in edges else ""
        lines.append(f"| {run} | {cells} | **{best_lr[run]:g}**{edge} |")
    return lines + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "digits_settings"))
    p.add_argument("--workdirs", default="/tmp/digits_settings")
    p.add_argument("--epochs", default="48,96,160")
    p.add_argument("--lrs", default="0.003,0.01,0.03,0.1,0.3")
    p.add_argument("--long-epochs", type=int, default=200)
    p.add_argument("--seeds", default="0,1")
    p.add_argument(
        "--earlier",
        default="",
        help="an earlier search's choices.json: its linear / kNN numbers stand in for pretraining "
        "runs whose workdir is gone (marked in choices.md; they do not depend on the classifiers' "
        "learning rates)",
    )
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {"epochs": {}, "lr": {}}

    def row(kind, value, seed, r):
        runs[kind].setdefault(value, {})[seed] = r
        print(kind, value, "seed", seed, r, flush=True)

    earlier = json.load(open(args.earlier))["runs"]["epochs"] if args.earlier else {}
    for epochs in [int(e) for e in args.epochs.split(",")]:
        for seed in seeds:
            wd = os.path.join(args.workdirs, f"e{epochs}_s{seed}")
            kept = earlier.get(str(epochs), {}).get(str(seed))
            if kept and not os.path.exists(os.path.join(wd, "report.json")):
                row("epochs", epochs, seed, {"linear": kept["linear"], "knn": kept["knn"]})
                runs["epochs"][epochs][seed]["earlier"] = True
                continue
            flags = [f"--config.pretrain.epochs={epochs}", f"--config.seed={seed}"]
            row("epochs", epochs, seed, _run(wd, flags))

    def frozen(value):
        rs = runs["epochs"][value].values()
        return statistics.mean((r["linear"] + r["knn"]) / 2 for r in rs)

    best_epochs = max(runs["epochs"], key=frozen)
    for lr in sorted(float(v) for v in args.lrs.split(",")):
        for seed in seeds:
            source = os.path.join(args.workdirs, f"e{best_epochs}_s{seed}")
            name = f"e{best_epochs}_s{seed}_lr{lr:g}_long{args.long_epochs}"
            flags = [
                "--mode=downstream",
                f"--config.restore={source}",
                f"--config.pretrain.epochs={best_epochs}",
                f"--config.seed={seed}",
                f"--config.downstream.long_epochs={args.long_epochs}",
                *_lr_flags(lr),
            ]
            row("lr", lr, seed, _run(os.path.join(args.workdirs, name), flags))

    def best(run):  # max keeps the first of equals: the smaller rate
        return max(
            runs["lr"], key=lambda lr: statistics.mean(r[run] for r in runs["lr"][lr].values())
        )

    best_lr = {run: best(run) for run in CLASSIFIERS}
    lines = _markdown(runs, seeds, best_epochs, best_lr, args.long_epochs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "choices.json"), "w") as f:
        out = {"runs": runs, "epochs": best_epochs, "long_epochs": args.long_epochs}
        json.dump({**out, "lr": best_lr}, f, indent=1)
    with open(os.path.join(args.out, "choices.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
