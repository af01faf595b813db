"""The report of a run, from the files in its workdir only: metrics.jsonl and config.json ->
report.json (every number), report.md (`report/markdown.py`: the table a person reads first, every
accuracy beside its baselines on the same labelled images and test split) and the plots of
`plots.py`.

It imports neither jax nor the training modules, so it can be rerun on a finished (or copied)
workdir:  python -m simclr_jax.report.build WORKDIR
"""

import json
import math
import os
import sys

from simclr_jax.report import markdown as report_md
from simclr_jax.report import plots, sections
from simclr_jax.runtime.files import (
    ACCURACY_PNG,
    CONFIG_FILE,
    LOSS_PNG,
    METRICS_FILE,
    REPORT_JSON,
    REPORT_MD,
    read_records,
)

RUNS = ("finetune", "scratch", "finetune_long", "scratch_long")  # classifier phases
STUDENTS = ("distill", "distill_labels")  # --mode=distill: the distilled and labels-only student
FROZEN = ("chance", "linear_pixels", "knn_pixels", "linear_random", "knn_random", "linear", "knn")
CURVE_KEYS = (("loss", "train_loss"), ("accuracy", "train_acc"), ("test_loss",) * 2)
CURVE_KEYS += (("test_acc",) * 2,)
# A run whose train or test accuracy still rose by more than ACC_RISE over its last
# CONVERGENCE_TAIL of epochs has not converged, nor has a short run that the long one of the same
# start beats by more than ACC_RISE.
CONVERGENCE_TAIL, ACC_RISE = 0.2, 0.01


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


def still_improving(c: dict) -> str | None:
    """Why a run has not converged (its train or test accuracy still rising by more than
    ACC_RISE over the last CONVERGENCE_TAIL of its epochs), or None."""
    n = len(c["epoch"])
    if n < 2:
        return None
    i = min(n - 2, int(round(n * (1 - CONVERGENCE_TAIL))) - 1)
    for split in ("train", "test"):
        then, now = c[f"{split}_acc"][i], c[f"{split}_acc"][-1]
        if then is not None and now is not None and now > then + ACC_RISE:
            return f"{split} acc {100 * then:.1f}% -> {100 * now:.1f}% since epoch {c['epoch'][i]}"
    return None


def _run_summary(config: dict, run: str, records: list[dict], batch: int | None = None) -> dict:
    c = curves(records)
    done = bool(c["epoch"])
    batch = batch or config["downstream"]["batch_size"]
    return {
        **c,
        **run_settings(config, run, records),
        "final_test_acc": c["test_acc"][-1] if done else None,
        "final_test_loss": c["test_loss"][-1] if done else None,
        "not_converged": still_improving(c) if done else None,
        "subset": records[-1].get("subset") if records else None,
        "wall_s": loop_wall_s(records, batch),
    }


def run_settings(config: dict, run: str, records: list[dict]) -> dict:
    """A classifier run's peak learning rate (what its records say; for a workdir older than
    downstream.runs, the config's shared one) and what that rate was chosen on (the run's own
    downstream.runs.<run>.chosen_on, else the config's settings_chosen_on)."""
    dc = config["downstream"]
    own = (dc.get("runs") or {}).get(run) or {}
    logged = [r["peak_learning_rate"] for r in records if "peak_learning_rate" in r]
    return {
        "learning_rate": logged[-1] if logged else sections.peak_lr(dc) if records else None,
        "chosen_on": own.get("chosen_on") or config.get("settings_chosen_on") or None,
    }


def _student_summary(config: dict, phase: str, records: list[dict]) -> dict:
    """A student run of --mode=distill as a classifier run, with its images per step (the
    distilled one's batch is distill.batch_size) and what its settings were chosen on."""
    dist = config.get("distill") or {}
    batch = dist.get("batch_size") if phase == "distill" else None
    out = _run_summary(config, phase, records, batch)
    out["chosen_on"] = dist.get("chosen_on") or config.get("settings_chosen_on") or None
    return out


def _pretrain_summary(records: list[dict], config: dict) -> dict:
    records = sorted(records, key=lambda r: r["step"])
    knn = plots.curve(records, "knn_acc")
    return {
        "steps": records[-1]["step"] if records else None,
        "final_loss": records[-1].get("loss") if records else None,
        "knn_acc": knn[-1][1] if knn else None,
        "knn_curve": knn,
        "online_probe": _probe_summary(records, config),
        "wall_s": loop_wall_s(records, config["pretrain"]["batch_size"]),
    }


def _probe_summary(records: list[dict], config: dict) -> dict | None:
    """The online linear head (pretrain.online_probe): its last train-view accuracy and loss
    (averaged over the last log interval), its test accuracy at the kNN monitor's points; or why
    it was off. None where the records hold none and nothing says it was off (pretraining records
    written before the head existed)."""
    pc, d = config["pretrain"], config["data"]
    train, test = plots.curve(records, plots.PROBE_ACC), plots.curve(records, plots.PROBE_TEST_ACC)
    off = None
    if not train:  # a head that trains is in every record
        unlabelled = d.get("pretrain_unlabelled") or 0
        total = ((d.get("identity") or {}).get("pretrain") or {}).get("num_examples")
        if pc.get("online_probe") is False:
            off = "pretrain.online_probe=False"
        elif unlabelled:
            off = (
                f"{unlabelled}{f' of the {total}' if total else ''} pretraining images "
                f"(data.pretrain_split={d['pretrain_split']!r}) have no label"
            )
        else:
            return None
    last = records[-1] if train else {}
    return {
        "on": bool(train),
        "off_because": off,
        "train_acc": last.get(plots.PROBE_ACC),
        "train_loss": last.get(plots.PROBE_LOSS),
        "test_acc": test[-1][1] if test else None,
        "train_curve": train,
        "test_curve": test,
    }


def datasets(config: dict) -> dict:
    """What the run pretrained on and what its downstream stage read: the transfer dataset of
    downstream.data where it names one, else the pretraining data's labelled splits."""
    d, t = config["data"], config["downstream"].get("data") or {}
    down = t if t.get("name") else d
    return {
        "pretrain": {"name": d["name"], "split": d["pretrain_split"]},
        "downstream": {
            "name": down["name"],
            "train_split": down["train_split"],
            "test_split": down["test_split"],
            "validation_fraction": down.get("validation_fraction") or 0.0,
            "transfer": bool(t.get("name")),
        },
    }


def build(workdir: str) -> dict:
    """Everything the report shows, from the workdir's files."""
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        config = json.load(f)
    by_phase: dict[str, list[dict]] = {}
    for r in read_records(os.path.join(workdir, METRICS_FILE)):
        by_phase.setdefault(r.get("phase"), []).append(r)
    dc = config["downstream"]
    frozen = {p: (by_phase.get(p) or [None])[-1] for p in FROZEN}
    sizes = frozen["knn"] or frozen["linear"] or {}
    rep = {
        "workdir": os.path.abspath(workdir),
        "label_fraction": dc["label_fraction"],
        "num_labelled": sizes.get("num_labelled"),
        "num_test": sizes.get("num_test"),
        "subset": sizes.get("subset"),  # data.subset_digest of the labelled images
        "encoder_step": sizes.get("encoder_step"),  # the pretraining step f was restored from
        "encoder_source": config.get("restore") or "this workdir",
        "datasets": datasets(config),
        "num_classes": sizes.get("num_classes"),
        "pretrain": _pretrain_summary(by_phase.get("pretrain", []), config),
        **{run: _run_summary(config, run, by_phase.get(run, [])) for run in RUNS},
        **{p: _student_summary(config, p, by_phase.get(p, [])) for p in STUDENTS},
        **frozen,
        "config": config,
    }
    for run in ("finetune", "scratch"):  # the long budget shows whether the short one was enough
        short, long = rep[run], rep[f"{run}_long"]
        if short["epoch"] and long["epoch"]:
            gain = long["final_test_acc"] - short["final_test_acc"]
            if gain > ACC_RISE and not short["not_converged"]:
                short["not_converged"] = (
                    f"the {long['epoch'][-1]}-epoch run reached {100 * long['final_test_acc']:.1f}%"
                )
    rep["wall_s"] = {
        "pretrain": rep["pretrain"]["wall_s"],
        **{run: rep[run]["wall_s"] for run in RUNS + STUDENTS},
        **{p: (frozen[p] or {}).get("wall_s") for p in FROZEN[1:]},
    }
    rep["warnings"] = run_warnings(config, frozen)
    rep["summary"] = summary(rep)
    return rep


def run_warnings(config: dict, frozen: dict) -> list[str]:
    """What the run was warned of, one line each: the settings that were legal but odd
    (config.json's `warnings`, from app/data_checks.py) and the linear probes whose fits had not converged
    (their records' `not_converged`)."""
    out = list(config.get("warnings") or [])
    names = {key: what for key, what, _ in report_md.ROWS}
    for phase, r in frozen.items():
        if r and r.get("not_converged"):
            out.append(f"{names.get(phase, phase)}: {r['not_converged']}")
    return out


def _acc(rep: dict, key: str) -> float | None:
    r = rep.get(key)
    if not r:
        return None
    return r.get("final_test_acc") if key in RUNS + STUDENTS else r.get("test_acc")


def summary(rep: dict) -> dict:
    """The headline numbers (what pipeline.run returns): every method's test accuracy and the
    differences the report is about."""
    out = {f"{k}_test_acc": _acc(rep, k) for k in RUNS + FROZEN + STUDENTS}
    teacher = (rep["config"].get("distill") or {}).get("teacher", "finetune_long")
    pairs = {
        "distilled_minus_labels_only": ("distill", "distill_labels"),
        "distilled_minus_teacher": ("distill", teacher),
        "linear_minus_pixels": ("linear", "linear_pixels"),
        "knn_minus_pixels": ("knn", "knn_pixels"),
        "linear_minus_random": ("linear", "linear_random"),
        "pretrained_minus_scratch": ("finetune", "scratch"),
        "pretrained_minus_scratch_long": ("finetune_long", "scratch_long"),
    }
    for name, (a, b) in pairs.items():
        if None not in (_acc(rep, a), _acc(rep, b)):
            out[name] = _acc(rep, a) - _acc(rep, b)
    return out


def write(workdir: str) -> dict:
    """Writes report.json, report.md, accuracy.png and loss.png into `workdir`; returns the report."""
    rep = build(workdir)
    tmp = os.path.join(workdir, REPORT_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=2, allow_nan=True)
    os.replace(tmp, os.path.join(workdir, REPORT_JSON))
    with open(os.path.join(workdir, REPORT_MD), "w") as f:
        f.write(report_md.markdown(rep, ACCURACY_PNG, LOSS_PNG))
    plots.classifier_curves(rep, "acc", os.path.join(workdir, ACCURACY_PNG))
    plots.classifier_curves(rep, "loss", os.path.join(workdir, LOSS_PNG))
    return rep


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m simclr_jax.report.build WORKDIR", file=sys.stderr)
        return 2
    write(argv[1])
    print(os.path.join(argv[1], REPORT_MD))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
