"""What a run shows in the terminal besides the progress bars: the package's log lines, printed
above the bars (tqdm's logging redirect) instead of through them, and the closing summary.
Imports neither jax nor the training modules."""

import contextlib
import logging
import os

from tqdm.contrib.logging import logging_redirect_tqdm

from simclr_jax.runtime.files import REPORT_MD, checkpoint_dir


@contextlib.contextmanager
def logs_above_progress_bars(logger_name: str = "simclr_jax"):
    """Within: the records of `logger_name` go through `tqdm.write`, which clears the bars, prints
    the line and redraws them (printed straight to stderr, a line lands in the middle of a bar).
    absl's format is kept; the records no longer propagate to the root (absl's) handler."""
    from absl import logging as absl_logging

    logger = logging.getLogger(logger_name)
    with logging_redirect_tqdm(loggers=[logger]):
        propagate = logger.propagate
        logger.handlers[-1].setFormatter(absl_logging.PythonFormatter())  # the one tqdm added
        logger.propagate = False
        try:
            yield
        finally:
            logger.propagate = propagate


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def summary_lines(summary: dict) -> list[str]:
    """The closing lines of run.py from pipeline.run's summary: the comparison's numbers and the
    absolute path of report.md, or pretraining's final loss and checkpoints."""
    workdir = summary["workdir"]
    lines = [f"done: results in {workdir}"]
    pre = summary.get("pretrain")
    if pre:
        loss = pre.get("loss")
        lines.append(
            f"  pretraining: step {pre.get('step', '?')}, loss "
            f"{'?' if loss is None else f'{loss:.4f}'}; checkpoints in "
            f"{checkpoint_dir(workdir, 'pretrain')}"
        )
    down = summary.get("downstream")
    if down:
        ft, sc = down.get("finetune_test_acc"), down.get("scratch_test_acc")
        gap = down.get("pretrained_minus_scratch")
        lines.append(
            f"  test accuracy: fine-tuned from SimCLR {_pct(ft)}, from scratch {_pct(sc)}"
            + ("" if gap is None else f" ({100 * gap:+.2f} points)")
        )
        lines.append(
            f"  frozen encoder: linear probe {_pct(down.get('linear_test_acc'))}, "
            f"kNN {_pct(down.get('knn_test_acc'))}"
        )
        lines.append(f"  report: {os.path.join(workdir, REPORT_MD)}")
    dist = summary.get("distill")
    if dist:
        gap = dist.get("distilled_minus_labels_only")
        lines.append(
            f"  test accuracy: distilled student {_pct(dist.get('distill_test_acc'))}, the same "
            f"student on the labels alone {_pct(dist.get('distill_labels_test_acc'))}"
            + ("" if gap is None else f" ({100 * gap:+.2f} points)")
        )
        lines.append(f"  report: {os.path.join(workdir, REPORT_MD)}")
    return lines
