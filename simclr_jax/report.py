"""The report of a run, from the files in its workdir only: metrics.jsonl and config.json ->
report.json (every number), report.md (the table a person reads first) and the plots of
`plots.py` (test accuracy / test loss per epoch, the pretrained and the scratch classifier on the
same axes).

It imports neither jax nor the training modules, so it can be rerun on a finished (or copied)
workdir:  python -m simclr_jax.report WORKDIR
"""

import json
import math
import os
import sys

from simclr_jax import plots

# The file names the training side writes (metrics.METRICS_FILE, pipeline.CONFIG_FILE); repeated
# here rather than imported, since those modules import jax.
METRICS_FILE, CONFIG_FILE = "metrics.jsonl", "config.json"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
ACCURACY_PNG, LOSS_PNG = "accuracy.png", "loss.png"
RUNS = ("finetune", "scratch")
CURVE_KEYS = (
    ("loss", "train_loss"),
    ("accuracy", "train_acc"),
    ("test_loss",) * 2,
    ("test_acc",) * 2,
)


def read_records(path: str) -> list[dict]:
    """metrics.jsonl's records (a torn last line from a kill is skipped); [] if there is none."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def loop_wall_s(records: list[dict], images_per_step: int) -> float | None:
    """Wall time of a step-loop phase, summed over its records (and so over resumed runs).

    The loop logs images_per_s = steps since the last record * images_per_step / seconds since
    it, so each record gives back its interval's seconds (steps, evaluation and logging).
    """
    total, prev = 0.0, 0
    for r in sorted(records, key=lambda r: r["step"]):
        rate = r.get("images_per_s")
        if rate and math.isfinite(rate) and rate > 0:
            total += (r["step"] - prev) * images_per_step / rate
        prev = r["step"]
    return total if records else None


def curves(records: list[dict]) -> dict:
    """Per-epoch curves of a classifier run: the records with a test evaluation, by step."""
    epochs = sorted((r for r in records if "test_acc" in r), key=lambda r: r["step"])
    out = {"epoch": [r.get("epoch", i + 1) for i, r in enumerate(epochs)]}
    for src, dst in CURVE_KEYS:
        out[dst] = [r.get(src) for r in epochs]
    return out


def _run_summary(records: list[dict], batch: int) -> dict:
    c = curves(records)
    done = bool(c["epoch"])
    return {
        **c,
        "final_test_acc": c["test_acc"][-1] if done else None,
        "final_test_loss": c["test_loss"][-1] if done else None,
        "best_test_acc": max(c["test_acc"]) if done else None,
        "wall_s": loop_wall_s(records, batch),
    }


def _pretrain_summary(records: list[dict], batch: int) -> dict:
    records = sorted(records, key=lambda r: r["step"])
    knn = [(r["step"], r["knn_acc"]) for r in records if "knn_acc" in r]
    return {
        "steps": records[-1]["step"] if records else None,
        "final_loss": records[-1].get("loss") if records else None,
        "knn_acc": knn[-1][1] if knn else None,
        "knn_curve": knn,
        "wall_s": loop_wall_s(records, batch),
    }


def build(workdir: str) -> dict:
    """Everything the report shows, from the workdir's files."""
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        config = json.load(f)
    records = read_records(os.path.join(workdir, METRICS_FILE))
    by_phase: dict[str, list[dict]] = {}
    for r in records:
        by_phase.setdefault(r.get("phase"), []).append(r)
    dc = config["downstream"]
    linear = (by_phase.get("linear") or [None])[-1]
    knn = (by_phase.get("knn") or [None])[-1]
    sizes = knn or linear or {}
    rep = {
        "workdir": os.path.abspath(workdir),
        "label_fraction": dc["label_fraction"],
        "num_labelled": sizes.get("num_labelled"),
        "num_test": sizes.get("num_test"),
        "encoder_step": sizes.get("encoder_step"),  # the pretraining step f was restored from
        "encoder_source": config.get("restore") or "this workdir",
        "pretrain": _pretrain_summary(
            by_phase.get("pretrain", []), config["pretrain"]["batch_size"]
        ),
        **{run: _run_summary(by_phase.get(run, []), dc["batch_size"]) for run in RUNS},
        "linear": linear,
        "knn": knn,
    }
    rep["wall_s"] = {
        "pretrain": rep["pretrain"]["wall_s"],
        **{run: rep[run]["wall_s"] for run in RUNS},
        "features": (sizes or {}).get("features_s"),
        "linear": linear and linear.get("wall_s"),
        "knn": knn and knn.get("wall_s"),
    }
    rep["config"] = config
    return rep


def summary(rep: dict) -> dict:
    """The headline numbers (what pipeline.run logs)."""
    out = {f"{run}_test_acc": rep[run]["final_test_acc"] for run in RUNS}
    for probe in ("linear", "knn"):
        out[f"{probe}_test_acc"] = rep[probe]["test_acc"] if rep[probe] else None
    if None not in (out["finetune_test_acc"], out["scratch_test_acc"]):
        out["pretrained_minus_scratch"] = out["finetune_test_acc"] - out["scratch_test_acc"]
    return out


# ----------------------------------------------------------------------------- markdown


def _or_q(x) -> str:
    return "?" if x is None else str(x)


def peak_lr(section: dict) -> float:
    """config.scaled_learning_rate, repeated (that module imports jax)."""
    lr, batch, rule = section["learning_rate"], section["batch_size"], section["lr_scaling"]
    return (
        lr * batch / 256.0 if rule == "linear" else lr * math.sqrt(batch) if rule == "sqrt" else lr
    )


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _num(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def _secs(x) -> str:
    if x is None:
        return "—"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def _header(rep: dict) -> list[str]:
    cfg = rep["config"]
    model = cfg["model"]
    return [
        f"# SimCLR on {cfg['data']['name']}: pretrained vs scratch",
        "",
        f"Labelled training images: **{_or_q(rep['num_labelled'])}** (label fraction "
        f"{rep['label_fraction']:g}, class-balanced, seed {cfg['seed']}); test images: "
        f"{_or_q(rep['num_test'])}. Encoder: {model['name']} "
        f"(width {model['width']:g}), SimCLR-pretrained on every train image without labels; "
        f"restored from step {_or_q(rep['encoder_step'])} of the pretraining run in "
        f"{rep['encoder_source']}. Wall times include compilation.",
        "",
    ]


def _method_table(rep: dict) -> list[str]:
    pre, lin, knn = rep["pretrain"], rep["linear"] or {}, rep["knn"] or {}
    lines = ["| Method | Test accuracy | Test loss | Wall time |", "|---|---:|---:|---:|"]
    for run, what in (
        ("finetune", "Fine-tuned from the pretrained encoder"),
        ("scratch", "From scratch"),
    ):
        r = rep[run]
        lines.append(
            f"| {what} ({len(r['epoch'])} epochs) | {_pct(r['final_test_acc'])} | "
            f"{_num(r['final_test_loss'])} | {_secs(r['wall_s'])} |"
        )
    pretrain_row = (
        f"| SimCLR pretraining ({pre['steps']} steps; kNN monitor, all train labels) | "
        f"{_pct(pre['knn_acc'])} | — | {_secs(pre['wall_s'])} |"
        if pre["steps"] is not None
        else "| SimCLR pretraining (another workdir) | — | — | — |"
    )
    return lines + [
        f"| Linear probe, frozen encoder ({lin.get('epochs', '—')} epochs) | "
        f"{_pct(lin.get('test_acc'))} | {_num(lin.get('test_loss'))} | {_secs(lin.get('wall_s'))} |",
        f"| kNN, frozen encoder (k={knn.get('k', '—')}, T={knn.get('temperature', '—')}) | "
        f"{_pct(knn.get('test_acc'))} | — | {_secs(knn.get('wall_s'))} |",
        pretrain_row,
        "",
    ]


def _protocol(rep: dict) -> list[str]:
    dc = rep["config"]["downstream"]
    lines = []
    s = summary(rep)
    if "pretrained_minus_scratch" in s:
        lines.append(
            f"Pretrained minus scratch, final test accuracy: "
            f"**{100 * s['pretrained_minus_scratch']:+.2f} points**. Best epoch: "
            f"{_pct(rep['finetune']['best_test_acc'])} vs {_pct(rep['scratch']['best_test_acc'])}."
        )
    return lines + [
        f"Both classifiers: same data order, augmentation (random crop + flip), head init, "
        f"{dc['optimizer']} (peak lr {peak_lr(dc):g}, batch {dc['batch_size']}, weight decay "
        f"{dc['weight_decay']:g}), warm-up then cosine decay; only the encoder's initial weights differ. "
        f"Frozen features (BN in inference mode) come from the pretrained encoder; kNN: cosine "
        f"similarity, temperature-weighted votes; the linear probe uses standardised features.",
        "",
    ]


def _per_epoch(rep: dict) -> list[str]:
    lines = [
        "## Per epoch",
        "",
        "| Epoch | Pretrained test acc | Scratch test acc | Pretrained test loss | Scratch test loss |",
        "|---:|---:|---:|---:|---:|",
    ]
    ft, sc = rep["finetune"], rep["scratch"]
    for i in range(max(len(ft["epoch"]), len(sc["epoch"]))):

        def at(run, key, i=i):
            return run[key][i] if i < len(run[key]) else None

        epoch = at(ft, "epoch") or at(sc, "epoch")
        lines.append(
            f"| {epoch} | {_pct(at(ft, 'test_acc'))} | {_pct(at(sc, 'test_acc'))} | "
            f"{_num(at(ft, 'test_loss'))} | {_num(at(sc, 'test_loss'))} |"
        )
    return lines


def markdown(rep: dict) -> str:
    lines = _header(rep) + _method_table(rep) + _protocol(rep) + _per_epoch(rep)
    lines += ["", f"![test accuracy]({ACCURACY_PNG})", "", f"![test loss]({LOSS_PNG})", ""]
    lines += _pictures(rep)
    return "\n".join(lines)


# The pictures that pictures.py writes, with what each shows.
PICTURES = (
    (plots.VIEWS_PNG, "Augmented views: source images and their two SimCLR views at step 0"),
    (plots.PRETRAIN_PNG, "Pretraining: loss, learning rate and kNN-monitor accuracy per step"),
    (plots.NEIGHBOURS_PNG, "Nearest training images of test images in h-space (cosine similarity)"),
)


def _pictures(rep: dict) -> list[str]:
    """Links to the pictures of the run that are in its workdir."""
    found = [(f, what) for f, what in PICTURES if os.path.exists(os.path.join(rep["workdir"], f))]
    lines = ["## Pictures", ""] if found else []
    for name, what in found:
        lines += [f"{what}:", "", f"![{what}]({name})", ""]
    return lines


def write(workdir: str) -> dict:
    """Writes report.json, report.md, accuracy.png and loss.png into `workdir`; returns the report."""
    rep = build(workdir)
    tmp = os.path.join(workdir, REPORT_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=2, allow_nan=True)
    os.replace(tmp, os.path.join(workdir, REPORT_JSON))
    with open(os.path.join(workdir, REPORT_MD), "w") as f:
        f.write(markdown(rep))
    plots.classifier_curves(rep, "acc", os.path.join(workdir, ACCURACY_PNG))
    plots.classifier_curves(rep, "loss", os.path.join(workdir, LOSS_PNG))
    return rep


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m simclr_jax.report WORKDIR", file=sys.stderr)
        return 2
    write(argv[1])
    print(os.path.join(argv[1], REPORT_MD))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
