"""The run's pictures (PNG, matplotlib's object API: no pyplot, so no global backend or figure
state). Imports neither jax nor the training modules."""

LABELS = {"finetune": "fine-tuned from SimCLR f", "scratch": "from scratch"}
COLORS = {"finetune": "tab:blue", "scratch": "tab:orange"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def classifier_curves(rep: dict, metric: str, path: str) -> None:
    """The classifiers' `metric` ('acc' or 'loss') per epoch, one panel per budget (short, long):
    test solid, train dashed, one colour per start (fine-tuned, scratch); chance level marked on
    the accuracy panels."""
    from matplotlib.ticker import MaxNLocator

    budgets = [s for s in ("", "_long") if rep.get(f"finetune{s}", {}).get("epoch")] or [""]
    fig = _figure(5.2 * len(budgets), 4.2)
    name = "classifier accuracy" if metric == "acc" else "classifier cross-entropy loss"
    labelled = "?" if rep["num_labelled"] is None else rep["num_labelled"]
    for i, suffix in enumerate(budgets):
        ax = fig.add_subplot(1, len(budgets), i + 1)
        for run in LABELS:
            r = rep[run + suffix]
            for split, style in (("test", "-"), ("train", "--")):
                ys = r[f"{split}_{metric}"]
                if any(y is not None for y in ys):
                    marker = "o" if split == "test" and len(ys) <= 30 else None
                    label = f"{LABELS[run]}, {split}"
                    ax.plot(r["epoch"], ys, style, color=COLORS[run], marker=marker, label=label)
        if metric == "acc" and (rep.get("chance") or {}).get("test_acc") is not None:
            ax.axhline(rep["chance"]["test_acc"], color="gray", lw=1, ls=":", label="chance")
        epochs = max(rep[f"finetune{suffix}"]["epoch"] or [0])
        ax.set(xlabel="epoch", ylabel=name, title=f"{epochs}-epoch budget")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{rep['config']['data']['name']}, {labelled} labelled images: {name}")
    fig.tight_layout()
    fig.savefig(path)
