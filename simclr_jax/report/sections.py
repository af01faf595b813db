"""report.md's number formats and its later sections (the pretraining and the online linear head,
the protocol, the per-epoch curves, the pictures, the warnings), from the report dict; `markdown.py`
puts them after the table and the findings. Imports no jax.
"""

import math
import os

from simclr_jax.runtime import files

PICTURES = (
    (files.VIEWS_PNG, "Augmented views: source images and their two SimCLR views at step 0"),
    (
        files.PRETRAIN_PNG,
        "Pretraining: loss, learning rate, and the kNN monitor's and the online linear head's "
        "accuracy per step",
    ),
    (files.NEIGHBOURS_PNG, "Nearest training images of test images in h-space (cosine similarity)"),
)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def num(x) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.4f}"


def secs(x) -> str:
    if x is None:
        return "—"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def pts(x) -> str:
    return f"{100 * x:+.2f} points"


def peak_lr(section: dict) -> float:
    """config.scaled_learning_rate, repeated (that module imports jax)."""
    lr, batch, rule = section["learning_rate"], section["batch_size"], section["lr_scaling"]
    return (
        lr * batch / 256.0 if rule == "linear" else lr * math.sqrt(batch) if rule == "sqrt" else lr
    )


def pretraining(rep: dict) -> list[str]:
    pre, cfg = rep["pretrain"], rep["config"]
    if pre["steps"] is None:
        return []
    line = (
        f"Pretraining: {pre['steps']} steps of {cfg['pretrain']['batch_size']} images, final "
        f"NT-Xent loss {num(pre['final_loss'])}, {secs(pre['wall_s'])}."
    )
    if pre["knn_acc"] is not None:
        line += (
            f" kNN monitor at the end: {pct(pre['knn_acc'])} — it uses *every* train label as "
            f"its memory bank, so it is not comparable with the table above."
        )
    return ["## Pretraining", "", line, ""] + online_probe(pre)


def online_probe(pre: dict) -> list[str]:
    """The online linear head's numbers (or why it was off), and the accuracies at the kNN
    monitor's points side by side."""
    head = pre.get("online_probe")
    if head is None:
        return []
    if not head["on"]:
        return [f"Online linear head: off ({head['off_because']}).", ""]
    test = (
        f", test top-1 {pct(head['test_acc'])} at step {head['test_curve'][-1][0]}"
        if head["test_acc"] is not None
        else " (no test accuracy: it is read at the kNN monitor's points, pretrain.knn_every)"
    )
    lines = [
        f"Online linear head (a linear layer on stop_gradient(h) of each step's first views, "
        f"trained on their labels in the pretraining step, pretrain.online_probe): train-view "
        f"top-1 {pct(head['train_acc'])} and cross-entropy {num(head['train_loss'])} over "
        f"the last log interval{test}. Like the kNN monitor it learns from *every* train label.",
        "",
    ]
    knn, head_test = dict(pre["knn_curve"]), dict(head["test_curve"])
    train = dict(head["train_curve"])
    steps = sorted(set(knn) | set(head_test))
    if not steps:
        return lines
    lines += [
        "| Step | kNN monitor (test) | Online linear head (test) | Online linear head (train "
        "views) |",
        "|---:|---:|---:|---:|",
    ]
    for step in steps:
        lines.append(
            f"| {step} | {pct(knn.get(step))} | {pct(head_test.get(step))} | "
            f"{pct(train.get(step))} |"
        )
    return lines + [""]


def protocol(rep: dict) -> list[str]:
    dc = rep["config"]["downstream"]
    return [
        "## Protocol",
        "",
        f"Classifiers: the encoder plus a zero-initialised linear head, trained end to end with "
        f"{dc['optimizer']} (each run at its own peak lr, above; batch {dc['batch_size']}, "
        f"weight decay {dc['weight_decay']:g}, warm-up then cosine decay), random crop and flip "
        f"(p={rep['config']['augment']['flip_prob']:g}). The fine-tuned and the scratch runs "
        f"share the data order, augmentations, head init and schedule's shape; only the encoder's "
        f"initial weights and the peak learning rate differ: scratch starts from the weights "
        f"SimCLR pretraining started from. A run "
        f"is 'not converged' when its train or test accuracy rose by more than 1 point over its "
        f"last 20% of epochs. Frozen features: BN in inference mode; the logistic regression "
        f"(L-BFGS) takes standardised or raw features and its L2 penalty from "
        f"{list(dc['linear_l2_grid'])} (widened 10x past an edge the pick lands on) by "
        f"{dc['linear_folds']}-fold cross-validation on the labelled images; kNN: cosine "
        f"similarity, votes weighted by exp(similarity / T). Raw pixels: the images at the "
        f"encoder's input size in [0, 1], flattened. Random-init encoder: the pretraining's "
        f"initial weights, with BN statistics estimated on the labelled images (its residual "
        f"branches end in a BN whose scale starts at zero, as in training).",
        "",
    ]


def per_epoch(rep: dict) -> list[str]:
    ft, sc = rep["finetune"], rep["scratch"]
    lines = [
        "## Per epoch (short budget)",
        "",
        "| Epoch | Fine-tuned test acc | Scratch test acc | Fine-tuned test loss | "
        "Scratch test loss |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i in range(max(len(ft["epoch"]), len(sc["epoch"]))):

        def at(run, key, i=i):
            return run[key][i] if i < len(run[key]) else None

        lines.append(
            f"| {at(ft, 'epoch') or at(sc, 'epoch')} | {pct(at(ft, 'test_acc'))} | "
            f"{pct(at(sc, 'test_acc'))} | {num(at(ft, 'test_loss'))} | "
            f"{num(at(sc, 'test_loss'))} |"
        )
    return lines + [""]


def pictures(rep: dict) -> list[str]:
    """Links to the pictures of the run that are in its workdir."""
    found = [(f, what) for f, what in PICTURES if os.path.exists(os.path.join(rep["workdir"], f))]
    lines = ["## Pictures", ""] if found else []
    for name, what in found:
        lines += [f"{what}:", "", f"![{what}]({name})", ""]
    return lines


def warnings(rep: dict) -> list[str]:
    """What the run was warned of (report.run_warnings), where there is anything."""
    found = rep.get("warnings") or []
    return ["## Warnings", "", *(f"- {w}" for w in found), ""] if found else []
