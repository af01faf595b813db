"""The tables of benchmarks/results/digits_selector/selector.md, from the reports beside it:
`python benchmarks/selector_tables.py [benchmarks/results/digits_selector]`.

Each run's folder (`val_s<seed>_k<K>`, `test_s<seed>_k<K>`) holds the report.json of one
`--mode=downstream` run (selector.md has the commands). Prints one row per run (accuracies in %,
at the last epoch) and, per split and seed, the mean of the four SimCLR rows (linear probe, kNN,
fine-tuned 10 and 200 epochs) and of the two fine-tuned ones, per selector; then both means over
the seeds of the validation split. tests/test_benchmarks.py checks that selector.md holds every
line it prints for the committed reports.
"""

import json
import os
import re
import sys

# (report.json summary key, column); the first four are the SimCLR rows the criterion averages.
COLUMNS = (
    ("linear_test_acc", "SimCLR linear"),
    ("knn_test_acc", "SimCLR kNN"),
    ("finetune_test_acc", "fine-tuned 10 ep"),
    ("finetune_long_test_acc", "fine-tuned 200 ep"),
    ("scratch_test_acc", "scratch 10 ep"),
    ("scratch_long_test_acc", "scratch 200 ep"),
    ("linear_random_test_acc", "random-init linear"),
    ("knn_random_test_acc", "random-init kNN"),
    ("linear_pixels_test_acc", "pixels linear"),
    ("knn_pixels_test_acc", "pixels kNN"),
)


def runs(root: str) -> dict:
    """{(split, seed, K): {column key: accuracy in %}} of the run folders under `root`."""
    out = {}
    for name in sorted(os.listdir(root)):
        m = re.fullmatch(r"(val|test)_s(\d+)_k(\d+)", name)
        if not m:
            continue
        with open(os.path.join(root, name, "report.json")) as f:
            summary = json.load(f)["summary"]
        key = (m.group(1), int(m.group(2)), int(m.group(3)))
        out[key] = {k: 100 * summary[k] for k, _ in COLUMNS}
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main(root: str) -> None:
    found = runs(root)
    for split in ("val", "test"):
        print(f"\n{split}:\n| seed, K | " + " | ".join(c for _, c in COLUMNS) + " |")
        print("|---|" + "---:|" * len(COLUMNS))
        for (s, seed, k), acc in sorted(found.items()):
            if s == split:
                print(f"| {seed}, {k} | " + " | ".join(f"{acc[c]:.2f}" for c, _ in COLUMNS) + " |")
    keys = [c for c, _ in COLUMNS]
    for split in ("val", "test"):
        seeds = sorted({seed for s, seed, _ in found if s == split})
        for seed in seeds:
            for k in sorted(k for s, sd, k in found if (s, sd) == (split, seed)):
                acc = found[(split, seed, k)]
                four, tuned = mean(acc[c] for c in keys[:4]), mean(acc[c] for c in keys[2:4])
                print(f"{split} seed {seed} K={k}: mean of four {four:.2f}, fine-tuned {tuned:.2f}")
    seeds = sorted({seed for s, seed, _ in found if s == "val"})
    for k in sorted({k for s, _, k in found if s == "val"}):
        rows = [found[("val", seed, k)] for seed in seeds if ("val", seed, k) in found]
        four = mean(mean(a[c] for c in keys[:4]) for a in rows)
        tuned = mean(mean(a[c] for c in keys[2:4]) for a in rows)
        print(f"val over seeds {seeds} K={k}: mean of four {four:.2f}, fine-tuned {tuned:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/digits_selector")
