"""The run's pictures (PNG, matplotlib's object API: no pyplot, so no global backend or figure
state). Imports neither jax nor the training modules.

* `classifier_curves`: the downstream classifiers per epoch (report/build.py);
* `views_grid`, `pretrain_curves`, `neighbours_grid`: the pictures people check first in
  self-supervised learning (the augmented views, the pretraining curves, nearest neighbours in
  feature space), from data that `pictures.py` gathers.
"""

import numpy as np

# The online linear head's record keys (pretrain.PROBE_*, repeated: that module imports jax).
PROBE_LOSS, PROBE_ACC = "online_probe_loss", "online_probe_acc"
PROBE_TEST_ACC = "online_probe_test_acc"

LABELS = {"finetune": "fine-tuned from SimCLR f", "scratch": "from scratch"}
COLORS = {"finetune": "tab:blue", "scratch": "tab:orange"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def classifier_curves(rep: dict, metric: str, path: str):
    """The classifiers' `metric` ('acc' or 'loss') per epoch, one panel per budget (short, long):
    test solid, train dashed, one colour per start (fine-tuned, scratch); chance level on the
    accuracy panels; loss axes robust to a few outliers. Returns the figure."""
    from matplotlib.ticker import MaxNLocator

    budgets = [s for s in ("", "_long") if (rep.get(f"finetune{s}") or {}).get("epoch")] or [""]
    fig = _figure(5.2 * len(budgets), 4.2)
    name = "classifier accuracy" if metric == "acc" else "classifier cross-entropy loss"
    chance = (rep.get("chance") or {}).get("test_acc")
    for i, suffix in enumerate(budgets):
        ax = fig.add_subplot(1, len(budgets), i + 1)
        values = []
        for run in LABELS:
            r = rep[run + suffix]
            for split, style in (("test", "-"), ("train", "--")):
                ys = r[f"{split}_{metric}"]
                if any(y is not None for y in ys):
                    marker = "o" if split == "test" and len(ys) <= 30 else None
                    label = f"{LABELS[run]}, {split}"
                    ax.plot(r["epoch"], ys, style, color=COLORS[run], marker=marker, label=label)
                    values += ys
        if metric == "acc" and chance is not None:  # the level a classifier must beat
            ax.axhline(chance, color="gray", lw=1, ls=":", label=f"chance ({100 * chance:.0f}%)")
        elif values:
            ax.set_ylim(*robust_limits(values))
        epochs = max(rep[f"finetune{suffix}"]["epoch"] or [0])
        ax.set(xlabel="epoch", ylabel=f"{name} (train dashed, test solid)")
        ax.set_title(f"{epochs}-epoch budget")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    labelled = "?" if rep["num_labelled"] is None else rep["num_labelled"]
    fig.suptitle(f"{rep['config']['data']['name']}, {labelled} labelled images: {name}")
    fig.tight_layout()
    fig.savefig(path)
    return fig


# ----------------------------------------------------------------------------- the run's pictures


def _show(ax, image) -> None:
    """An image panel: uint8 or float in [0, 1], no ticks."""
    ax.imshow(image, interpolation="nearest", vmin=0, vmax=255 if image.dtype.kind == "u" else 1)
    ax.set_xticks([])
    ax.set_yticks([])


def views_grid(sources, view1, view2, path: str, title: str):
    """Source images (top row) and their two augmented views (rows below), one column each.
    sources: (n, H, W, 3) uint8; view1, view2: (n, S, S, 3) float in [0, 1]. Returns the figure."""
    n = len(sources)
    fig = _figure(1.2 * n + 0.6, 4.2)
    axes = fig.subplots(3, n, squeeze=False)
    for row, (name, images) in enumerate(
        (("source", sources), ("view 1", view1), ("view 2", view2))
    ):
        for col in range(n):
            _show(axes[row, col], np.asarray(images[col]))
        axes[row, 0].set_ylabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def robust_limits(values, margin: float = 0.05) -> tuple[float, float]:
    """y limits that a few outliers do not set: the data range clipped to Tukey's far fences
    (quartiles -/+ 3 IQR) when there are 8 values or more, plus a margin."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    lo, hi = float(v.min()), float(v.max())
    if len(v) >= 8:
        q1, q3 = np.percentile(v, [25, 75])
        lo, hi = max(lo, q1 - 3 * (q3 - q1)), min(hi, q3 + 3 * (q3 - q1))
    pad = margin * (hi - lo) or 0.05 * (abs(hi) or 1.0)
    return lo - pad, hi + pad


def _loss_panel(ax, steps, loss) -> None:
    """The NT-Xent loss on an outlier-robust axis; points beyond it as triangles on its edge."""
    ax.plot(steps, loss, color="tab:blue", marker="." if len(steps) < 30 else None)
    lo, hi = robust_limits(loss)
    ax.set_ylim(lo, hi)
    above = [(s, hi) for s, y in zip(steps, loss, strict=True) if y is not None and y > hi]
    below = [(s, lo) for s, y in zip(steps, loss, strict=True) if y is not None and y < lo]
    for points, marker in ((above, "^"), (below, "v")):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker, color="tab:red", clip_on=False, label="off the axis")
    if above or below:
        ax.legend(loc="upper right")
    ax.set(xlabel="step", ylabel="NT-Xent loss", title="pretraining loss")


def curve(records: list[dict], key: str) -> list[tuple]:
    """(step, value) of the records that have `key`, by step."""
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def pretrain_curves(records: list[dict], path: str, title: str, chance: float | None = None):
    """Pretraining against the step, one panel each: the NT-Xent loss (axis robust to outliers;
    points beyond it drawn as triangles on its edge), the learning rate and, when the run logged
    them, the accuracies read while it trains: the kNN monitor's and the online linear head's on
    the test split, the head's on the train views (chance level dashed). Returns the figure."""
    records = sorted(records, key=lambda r: r["step"])
    steps = [r["step"] for r in records]
    knn, head_train = curve(records, "knn_acc"), curve(records, PROBE_ACC)
    panels = 2 + bool(knn or head_train)
    fig = _figure(4.2 * panels, 3.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    _loss_panel(axes[0], steps, [r.get("loss") for r in records])
    ax = axes[1]
    ax.plot(steps, [r.get("learning_rate") for r in records], color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    ax.set_ylim(bottom=0)
    if panels == 3:
        _accuracy_panel(axes[2], knn, curve(records, PROBE_TEST_ACC), head_train, chance)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def _accuracy_panel(ax, knn, head_test, head_train, chance) -> None:
    """The kNN monitor (test), the online linear head (test, and train views dashed), chance."""
    from matplotlib.ticker import PercentFormatter

    lines = (
        (knn, "o-", "tab:purple", "kNN monitor (test)"),
        (head_test, "s-", "tab:red", "online linear head (test)"),
        (head_train, "--", "tab:red", "online linear head (train views)"),
    )
    for points, style, color, label in lines:
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, color=color, label=label)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", label=f"chance ({100 * chance:.0f}%)")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(xlabel="step", ylabel="top-1 accuracy", title="while pretraining: kNN, linear head")
    ax.legend(loc="best", fontsize="small")


def neighbours_grid(
    queries, query_labels, neighbours, neighbour_labels, sims, path: str, title: str
):
    """One row per test image (first column) and its nearest training images by cosine
    similarity of h; each neighbour titled with its label and similarity, framed green when its
    label is the query's, red otherwise. queries: (q, H, W, 3) uint8; neighbours: (q, k, H, W, 3).
    Returns the figure."""
    q, k = np.shape(neighbour_labels)
    fig = _figure(1.25 * (k + 1) + 0.4, 1.35 * q + 0.8)
    axes = fig.subplots(q, k + 1, squeeze=False)
    for i in range(q):
        _show(axes[i, 0], np.asarray(queries[i]))
        axes[i, 0].set_title(f"test, label {query_labels[i]}", fontsize=8)
        for j in range(k):
            ax = axes[i, j + 1]
            _show(ax, np.asarray(neighbours[i][j]))
            same = neighbour_labels[i][j] == query_labels[i]
            ax.set_title(f"{neighbour_labels[i][j]}, cos {sims[i][j]:.3f}", fontsize=8)
            for spine in ax.spines.values():
                spine.set(color="tab:green" if same else "tab:red", linewidth=2.5)
    for j in range(k):
        axes[0, j + 1].set_title(f"#{j + 1}: " + axes[0, j + 1].get_title(), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return fig
