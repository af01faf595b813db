"""The digits demo over seeds: its test numbers once per seed, and the spread.

Runs the demo's own command (`python run.py --config configs/digits_simclr.py`) with
`--config.seed=S` for each seed (the seed draws the initial weights, the data order, the
augmentations and the labelled subset) and tabulates each run's report.json: the frozen
evaluations beside their baselines, and the classifiers.

  python benchmarks/demo_seeds.py --seeds 0,1,2 --out benchmarks/results/digits_demo

Writes OUT/seeds.md and OUT/seeds.json; seed 0's report (report.md, report.json, pictures) is
copied to OUT as the demo's reference run.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("report.md", "report.json", "accuracy.png", "pretrain.png")
RUNS = ("finetune", "scratch", "finetune_long", "scratch_long")  # the classifier runs


def _acc(rep: dict, key: str) -> float:
    return 100.0 * rep[key]["test_acc"]


def _spread(values: list[float]) -> str:
    return " / ".join(f"{v:+.2f}" for v in (min(values), statistics.mean(values), max(values)))


def _pair(r: dict, suffix: str) -> str:
    """'fine-tuned / scratch' test accuracies of one budget, * where the run had not converged."""
    return " / ".join(
        f"{r[run + suffix]:.2f}{'*' if r['not_converged'][run + suffix] else ''}"
        for run in ("finetune", "scratch")
    )


def _notes(path: str) -> str:
    """What follows the generated table in an existing seeds.md (from its first '## ' heading
    on: notes written by hand), kept when the table is rewritten."""
    if not os.path.exists(path):
        return ""
    text = open(path).read()
    at = text.find("\n## ")
    return "" if at < 0 else text[at:]


def _row(rep: dict) -> dict:
    """One seed's numbers from its report.json: test accuracies (%), the runs' rates and state."""
    return {
        "pixels_lr": _acc(rep, "linear_pixels"),
        "pixels_knn": _acc(rep, "knn_pixels"),
        "random_lr": _acc(rep, "linear_random"),
        "random_knn": _acc(rep, "knn_random"),
        "simclr_lr": _acc(rep, "linear"),
        "simclr_knn": _acc(rep, "knn"),
        **{run: 100.0 * rep[run]["final_test_acc"] for run in RUNS},
        "learning_rate": {run: rep[run].get("learning_rate") for run in RUNS},
        "not_converged": {run: rep[run]["not_converged"] for run in RUNS},
        "epochs": {run: rep[run]["epoch"][-1] for run in RUNS},
        "num_labelled": rep["num_labelled"],
    }


def _markdown(rows: dict, gains: dict, seeds: str) -> list[str]:
    """seeds.md's generated part: the table, the spreads and the rates."""
    first = next(iter(rows.values()))
    short, long = first["epochs"]["finetune"], first["epochs"]["finetune_long"]
    lines = [
        "# The demo's test numbers over seeds",
        "",
        f"`python benchmarks/demo_seeds.py --seeds {seeds}`: the demo's command with "
        f"`--config.seed=S`; each seed's test numbers are measured once (the settings were "
        f"chosen on validation data: choices.md). Test accuracy, %:",
        "",
        "| seed | labels | pixels LR | SimCLR LR | LR gain | pixels kNN | SimCLR kNN | kNN gain "
        f"| random-init LR / kNN | fine-tuned / scratch, {short} ep. | fine-tuned / scratch, "
        f"{long} ep. |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, r in rows.items():
        lines.append(
            f"| {seed} | {r['num_labelled']} | {r['pixels_lr']:.2f} | {r['simclr_lr']:.2f} | "
            f"{r['simclr_lr'] - r['pixels_lr']:+.2f} | {r['pixels_knn']:.2f} | "
            f"{r['simclr_knn']:.2f} | {r['simclr_knn'] - r['pixels_knn']:+.2f} | "
            f"{r['random_lr']:.2f} / {r['random_knn']:.2f} | {_pair(r, '')} | {_pair(r, '_long')} |"
        )
    lrs = {json.dumps(r["learning_rate"], sort_keys=True) for r in rows.values()}
    spread = {k: (min(v), statistics.mean(v), max(v)) for k, v in gains.items()}
    lines += [
        "",
        f"Gain over the stronger pixel baselines, min / mean / max over seeds: logistic "
        f"regression {spread['lr'][0]:+.2f} / {spread['lr'][1]:+.2f} / {spread['lr'][2]:+.2f}, "
        f"kNN {spread['knn'][0]:+.2f} / {spread['knn'][1]:+.2f} / {spread['knn'][2]:+.2f} "
        f"points. Fine-tuned minus scratch, min / mean / max: {short} epochs "
        f"{_spread(gains['finetune_minus_scratch'])}, {long} epochs "
        f"{_spread(gains['finetune_minus_scratch_long'])} points.",
        "",
        "Peak learning rates: "
        + (
            ", ".join(f"{run} {lr:g}" for run, lr in first["learning_rate"].items())
            if len(lrs) == 1
            else "they differ between seeds (seeds.json)"
        )
        + ". * = not converged (the report's test: train or test accuracy still rising by more "
        "than a point over the last 20% of epochs, or the long run well above the short one).",
        "",
    ]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdirs", default="/tmp/demo_seeds")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "digits_demo"))
    args = p.parse_args(argv)
    rows = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        wd = os.path.join(args.workdirs, f"seed{seed}")
        if not os.path.exists(os.path.join(wd, "report.json")):
            cmd = [sys.executable, "run.py", "--config", "configs/digits_simclr.py"]
            cmd += [f"--config.seed={seed}", "--workdir", wd]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        rep = json.load(open(os.path.join(wd, "report.json")))
        rows[seed] = _row(rep)
        print(seed, rows[seed], flush=True)
        if seed == 0:
            os.makedirs(args.out, exist_ok=True)
            for name in COPIED:
                if os.path.exists(os.path.join(wd, name)):
                    shutil.copy(os.path.join(wd, name), os.path.join(args.out, name))
    gains = {
        "lr": [r["simclr_lr"] - r["pixels_lr"] for r in rows.values()],
        "knn": [r["simclr_knn"] - r["pixels_knn"] for r in rows.values()],
        "finetune_minus_scratch": [r["finetune"] - r["scratch"] for r in rows.values()],
        "finetune_minus_scratch_long": [
            r["finetune_long"] - r["scratch_long"] for r in rows.values()
        ],
    }
    lines = _markdown(rows, gains, args.seeds)
    path = os.path.join(args.out, "seeds.md")
    notes = _notes(path)
    with open(path, "w") as f:
        f.write("\n".join(lines) + notes)
    with open(os.path.join(args.out, "seeds.json"), "w") as f:
        json.dump({"rows": rows, "gains": gains}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
