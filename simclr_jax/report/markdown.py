"""report.md from the report dict of `report.build`: one table with every method and baseline on
the same labelled images and test split, the findings (differences, what falls below a baseline,
which classifier has not converged), the pretraining, and the per-epoch curves.
"""

from simclr_jax.report.sections import (
    num,
    pct,
    per_epoch,
    pictures,
    pretraining,
    protocol,
    pts,
    secs,
    warnings,
)

# (key in the report, what the row says, is it a SimCLR row) in the order of the table.
ROWS = (
    ("linear_pixels", "Raw pixels: logistic regression", False),
    ("knn_pixels", "Raw pixels: kNN", False),
    (
        "linear_random",
        "Random-init encoder, frozen (BN statistics of the labelled images): logistic regression",
        False,
    ),
    (
        "knn_random",
        "Random-init encoder, frozen (BN statistics of the labelled images): kNN",
        False,
    ),
    ("linear", "SimCLR encoder, frozen: logistic regression", True),
    ("knn", "SimCLR encoder, frozen: kNN", True),
)
STUDENTS = ("distill", "distill_labels")  # report.STUDENTS (that module imports this one)
CLASSIFIERS = (
    ("finetune", "Classifier fine-tuned from the SimCLR encoder"),
    ("scratch", "Classifier trained from scratch"),
    ("finetune_long", "Classifier fine-tuned from the SimCLR encoder"),
    ("scratch_long", "Classifier trained from scratch"),
)


def _header(rep: dict) -> list[str]:
    cfg, n = rep["config"], rep["num_labelled"]
    model, pre = cfg["model"], rep["pretrain"]
    steps = f"{pre['steps']} steps" if pre["steps"] is not None else "another workdir's run"
    down = rep["datasets"]["downstream"]
    held, key = down["validation_fraction"], "downstream.data" if down["transfer"] else "data"
    scored = (
        f"{rep['num_test']} **validation** images ({key}.validation_fraction={held:g} of the "
        f"train split, held out of {'' if down['transfer'] else 'pretraining and of '}the "
        f"labelled images; the test split is not read)"
        if held
        else f"{rep['num_test']} test images"
    )
    chosen = cfg.get("settings_chosen_on") or "not recorded in this config"
    procedure = (
        "the logistic regressions pick their preprocessing (standardised or raw) and L2 penalty "
        "by cross-validation on the labelled images, kNN's k and temperature are fixed in the "
        "config, the classifiers are scored at their last epoch"
    )
    if chosen.startswith("validation"):
        nothing = f"Nothing is chosen on the test set: {procedure}."
    else:
        nothing = f"The evaluations choose nothing on the test set ({procedure})."
    return [
        f"# SimCLR on {_title(rep)}: the learned representation against its baselines",
        "",
        _datasets_line(rep),
        "",
        f"Every row uses the same **{n if n is not None else '?'} labelled training images** "
        f"(label fraction {rep['label_fraction']:g}, class-balanced, seed {cfg['seed']}; subset "
        f"`{rep['subset']}`) and is scored on the same {scored}. Encoder: "
        f"{model['name']} (width {model['width']:g}, {cfg['data']['image_size']} px), "
        f"SimCLR-pretrained without labels ({steps}; restored from step {rep['encoder_step']} of "
        f"the run in {rep['encoder_source']}). {nothing} Wall times include compilation.",
        "",
        features_line(cfg),
        "",
        f"Settings chosen on: {chosen}.",
        "",
        *_run_rates(rep, chosen),
    ]


def _title(rep: dict) -> str:
    pre, down = rep["datasets"]["pretrain"], rep["datasets"]["downstream"]
    return f"{pre['name']}, evaluated on {down['name']}" if down["transfer"] else pre["name"]


def _datasets_line(rep: dict) -> str:
    """Both datasets: 'Pretrained on digits (train), evaluated on cifar10 (train 5% labelled /
    test)'; a transfer dataset's input contract is the encoder's."""
    pre, down = rep["datasets"]["pretrain"], rep["datasets"]["downstream"]
    scored = "validation" if down["validation_fraction"] else down["test_split"]
    line = (
        f"Pretrained on {pre['name']} ({pre['split']}), evaluated on {down['name']} "
        f"({down['train_split']} {100 * rep['label_fraction']:g}% labelled / {scored}"
        f"{', ' + str(rep['num_classes']) + ' classes' if rep.get('num_classes') else ''})."
    )
    if down["transfer"]:
        data = rep["config"]["data"]
        line += (
            f" Transfer: every row below, baselines included, is on {down['name']}, whose images "
            f"are resized to the encoder's {data['image_size']} px and normalised with "
            f"{pre['name']}'s channel statistics, as in pretraining."
        )
    return line


def features_line(cfg: dict) -> str:
    """Which representation the frozen rows and the classifiers read (downstream.ft_proj_selector:
    0 = h, k = the projection head's k-th layer, -1 = the last: head_layers)."""
    given = (cfg.get("downstream") or {}).get("ft_proj_selector", 0)
    if not given:
        return "Features (frozen rows and classifiers' input): h (downstream.ft_proj_selector=0)."
    n = cfg["model"]["head_layers"]
    k = n if given == -1 else given  # config.resolve_selector (that module imports jax)
    what = "z" if k == n else "after its BN and ReLU"
    return (
        f"Features (frozen rows and classifiers' input): head layer {k} of {n} ({what}; "
        f"downstream.ft_proj_selector={given}): the output of the projection head's first {k} "
        f"layer(s), which the classifiers fine-tune with f (from the pretrained head, or for "
        f"scratch from its initial weights)."
    )


def _run_rates(rep: dict, chosen: str) -> list[str]:
    """Each classifier run's peak learning rate and what it was chosen on (said once where every
    run's was chosen on the same)."""
    done = [(rep[key], what) for key, what in CLASSIFIERS if rep[key]["epoch"]]
    done = [(r, what) for r, what in done if r.get("learning_rate") is not None]
    if not done:
        return []
    whys = {_why(r["chosen_on"], chosen) for r, _ in done}
    shared = len(whys) == 1
    lines = [f"Each classifier's learning rate{', chosen on: ' + whys.pop() if shared else ''}:"]
    lines += [""]
    for r, what in done:
        why = "" if shared else f", chosen on: {_why(r['chosen_on'], chosen)}"
        lines.append(f"- {what}, {r['epoch'][-1]} epochs: peak lr {r['learning_rate']:g}{why}.")
    return lines + [""]


def _why(run_chosen: str | None, chosen: str) -> str:
    return "as the settings above" if run_chosen == chosen else run_chosen or "not recorded"


def _table(rep: dict) -> list[str]:
    n, cfg = rep["num_labelled"], rep["config"]["downstream"]
    chance = rep["chance"] or {}
    lines = [
        "| Method | Labels | Test accuracy | Test loss | Wall time |",
        "|---|---:|---:|---:|---:|",
        f"| Chance (uniform guess) | 0 | {pct(chance.get('test_acc'))} | — | — |",
    ]
    for key, what, ours in ROWS:
        r = rep[key] or {}
        if key.startswith("knn"):
            what += f" (k={r.get('k', cfg['knn_k'])}, T={cfg['knn_temperature']:g})"
        elif r.get("preprocessing"):
            flag = ", not converged" if r.get("not_converged") else ""
            what += f" ({r['preprocessing']}, L2 {r['l2']:g}{flag})"
        cell = f"**{pct(r.get('test_acc'))}**" if ours else pct(r.get("test_acc"))
        lines.append(
            f"| {what} | {n} | {cell} | {num(r.get('test_loss'))} | {secs(r.get('wall_s'))} |"
        )
    for key, what in CLASSIFIERS:
        r = rep[key]
        if not r["epoch"]:
            continue
        flag = " (not converged)" if r["not_converged"] else ""
        lr = f", lr {r['learning_rate']:g}" if r.get("learning_rate") is not None else ""
        lines.append(
            f"| {what}, {r['epoch'][-1]} epochs{lr}{flag} | {n} | {pct(r['final_test_acc'])} | "
            f"{num(r['final_test_loss'])} | {secs(r['wall_s'])} |"
        )
    return lines + _student_rows(rep) + [""]


def _student(cfg: dict) -> str:
    """The student's network: config.model with distill.model's name and width where set."""
    own, model = cfg["distill"].get("model") or {}, cfg["model"]
    name, width = own.get("name") or model["name"], own.get("width") or model["width"]
    same = (name, width) == (model["name"], model["width"])
    return f"{name} width {width:g}" + (", the teacher's network" if same else "")


def _student_rows(rep: dict) -> list[str]:
    """The rows of --mode=distill's students, where it ran: the distilled one and the same student
    on the labels alone (the teacher is its fine-tuned row above)."""
    cfg, n, lines = rep["config"], rep["num_labelled"], []
    for key in STUDENTS:
        r = rep.get(key) or {}
        if not r.get("epoch"):
            continue
        dist, flag = cfg["distill"], " (not converged)" if r["not_converged"] else ""
        lr = f", lr {r['learning_rate']:g}" if r.get("learning_rate") is not None else ""
        if key == "distill":
            resized = dist.get("student_view") == "resized_crop"  # else the classifiers' crop
            view = ", random resized crop views" if resized else ""
            what = (
                f"Student ({_student(cfg)}) distilled from {dist['teacher']}, T="
                f"{dist['temperature']:g}, {r['epoch'][-1]} epochs over the pretraining images "
                f"(labels unused{view}){lr}{flag}"
            )
            labels = f"{n} (the teacher's)"
        else:
            what = f"The same student on the labels alone, {r['epoch'][-1]} epochs{lr}{flag}"
            labels = f"{n}"
        lines.append(
            f"| {what} | {labels} | **{pct(r['final_test_acc'])}** | "
            f"{num(r['final_test_loss'])} | {secs(r['wall_s'])} |"
        )
    return lines


def _findings(rep: dict) -> list[str]:
    s, lines = rep["summary"], ["## Findings", ""]
    named = {
        "linear_minus_pixels": "SimCLR logistic regression minus raw-pixel logistic regression",
        "knn_minus_pixels": "SimCLR kNN minus raw-pixel kNN",
        "linear_minus_random": "SimCLR logistic regression minus the random-init encoder's",
        "pretrained_minus_scratch": "Fine-tuned minus scratch, short budget",
        "pretrained_minus_scratch_long": "Fine-tuned minus scratch, long budget",
        "distilled_minus_labels_only": "Distilled student minus the same student on the labels",
        "distilled_minus_teacher": "Distilled student minus its teacher",
    }
    for key, text in named.items():
        if key in s:
            compared = "minus_scratch" in key or "distilled" in key  # not against a baseline
            below = " — **below the baseline**" if s[key] < 0 and not compared else ""
            lines.append(f"- {text}: **{pts(s[key])}**{below}.")
    students = [(k, f"Student run '{k}'") for k in STUDENTS if (rep.get(k) or {}).get("epoch")]
    for key, what in list(CLASSIFIERS) + students:
        r = rep[key]
        if r["epoch"]:
            state = f"not converged ({r['not_converged']})" if r["not_converged"] else "converged"
            lines.append(f"- {what}, {r['epoch'][-1]} epochs: {state}.")
    if students:
        why = rep["distill"].get("chosen_on") or "not recorded"
        lines.append(f"- The distillation's settings were chosen on: {why}.")
    return lines + [""]


def markdown(rep: dict, accuracy_png: str = "accuracy.png", loss_png: str = "loss.png") -> str:
    lines = (
        _header(rep)
        + warnings(rep)
        + _table(rep)
        + _findings(rep)
        + pretraining(rep)
        + protocol(rep)
    )
    lines += [f"![classifier accuracy]({accuracy_png})", "", f"![classifier loss]({loss_png})", ""]
    return "\n".join(lines + per_epoch(rep) + pictures(rep))
