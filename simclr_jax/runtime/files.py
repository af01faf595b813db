"""The workdir's file names and checkpoint paths, defined once, and its metrics records read back.
Imports no jax: the report is rebuilt from these files alone."""

import json
import os

CONFIG_FILE = "config.json"  # the run's settings (app.workdirs writes it)
METRICS_FILE = "metrics.jsonl"  # one record per logged step or evaluation (runtime.records)
ENCODER_FILE = "encoder.msgpack"  # f and g's variables, written when pretraining ends
REPORT_JSON, REPORT_MD = "report.json", "report.md"
ACCURACY_PNG, LOSS_PNG = "accuracy.png", "loss.png"
VIEWS_PNG, PRETRAIN_PNG, NEIGHBOURS_PNG = "views.png", "pretrain.png", "neighbours.png"
LOCK_FILE = ".lock"  # held while a run lives (app.lock)
CHECKPOINTS = "checkpoints"  # one folder per phase: pretrain, finetune, scratch, ...


def checkpoint_dir(workdir: str, phase: str = "") -> str:
    """The absolute path of a phase's checkpoints in `workdir` (of all of them without `phase`)."""
    root = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    return os.path.join(root, phase) if phase else root


def read_records(path: str, phase: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (of one phase), [] where there is none; a torn last line
    from a kill is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if phase is None or r.get("phase") == phase:
                out.append(r)
    return out
