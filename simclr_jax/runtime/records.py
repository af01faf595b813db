"""Metrics out: one JSON object per logged step in `metrics.jsonl`, the same scalars as TensorBoard
events (tensorboardX), and a tqdm progress bar. Only process 0 writes."""

import json
import math
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from simclr_jax.runtime.files import METRICS_FILE, read_records


def _to_python(v):
    v = np.asarray(v).item() if np.ndim(v) == 0 else v
    return float(v) if isinstance(v, float | np.floating) else v


class MetricWriter:
    """Appends {'step', 'phase', ...scalars} records; `truncate(phase, step)` drops records of
    `phase` after `step`, so that a resumed run's file has no duplicated steps."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def write(self, step: int, phase: str, scalars: dict) -> dict:
        record = {"step": int(step), "phase": phase}
        record.update({k: _to_python(v) for k, v in scalars.items()})
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        for k, v in record.items():
            if k not in ("step", "phase") and isinstance(v, int | float) and math.isfinite(v):
                self._tb.add_scalar(f"{phase}/{k}", v, int(step))
        return record

    def last(self, phase: str) -> dict | None:
        """The last record of `phase` (None: none, or not the writing process)."""
        if not self.enabled or not os.path.exists(self.path):
            return None
        records = read_records(self.path, phase)
        return records[-1] if records else None

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, self.path)  # atomic: a kill here leaves the old or the new file whole

    def truncate(self, phase: str, after_step: int) -> None:
        """Drops `phase` records with step > after_step (written after the checkpoint resumed)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [
            r
            for r in read_records(self.path)
            if not (r["phase"] == phase and r["step"] > after_step)
        ]
        self._rewrite(kept)

    def drop_phase(self, phase: str) -> None:
        self.truncate(phase, -1)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int, desc: str, enabled: bool | None = None):
    enabled = jax.process_index() == 0 if enabled is None else enabled
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0,
    )
