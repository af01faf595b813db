"""The run's pictures (PNG, matplotlib's object API: no pyplot, so no global backend or figure
state). Imports neither jax nor the training modules."""

LABELS = {"finetune": "pretrained (SimCLR f)", "scratch": "from scratch"}
COLORS = {"finetune": "tab:blue", "scratch": "tab:orange"}


def classifier_curves(rep: dict, metric: str, path: str) -> None:
    """`metric` ('acc' or 'loss') per epoch: test solid, train dashed, one colour per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for run in LABELS:
        r = rep[run]
        for split, style in (("test", "-"), ("train", "--")):
            ys = r[f"{split}_{metric}"]
            if any(y is not None for y in ys):
                ax.plot(
                    r["epoch"],
                    ys,
                    style,
                    color=COLORS[run],
                    marker="o" if split == "test" else None,
                    label=f"{LABELS[run]}, {split}",
                )
    name = "accuracy" if metric == "acc" else "cross-entropy loss"
    labelled = "?" if rep["num_labelled"] is None else rep["num_labelled"]
    title = f"{rep['config']['data']['name']}, {labelled} labelled images"
    ax.set(xlabel="epoch", ylabel=name, title=f"{title}: {name}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
