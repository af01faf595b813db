"""The linear probe on frozen features: multinomial logistic regression fitted by full-batch
L-BFGS (optax, a fixed number of iterations, each fit then checked for convergence), its
preprocessing (standardised or raw features) and L2 penalty chosen by stratified cross-validation
on the training features alone, the grid widened until it brackets the pick. Shared by the
downstream stage, the benchmarks and the baselines.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from simclr_jax.runtime import signals
from simclr_jax.train.state import LINEAR_KEY


def _stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each example: a seeded shuffle, then each class dealt round-robin, so every
    fold holds about 1 / folds of each class."""
    rng = np.random.default_rng([seed, LINEAR_KEY])
    order = rng.permutation(len(labels))
    fold = np.empty(len(labels), np.int32)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        fold[members] = (rng.integers(folds) + np.arange(len(members))) % folds
    return fold


def _probe_loss(params, x, y):
    """Mean cross-entropy per example (n,) of the softmax regression."""
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)


def _objective(params, xs, ys, weights, l2):
    """mean_w(cross-entropy) + l2 / 2 |W|^2, the mean taken with `weights` (n,) (0 leaves an
    example out); no penalty on the bias."""
    ce = _probe_loss(params, xs, ys)
    return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


def _fit_probe(xs, ys, weights, l2, num_classes: int, iters: int):
    """Multinomial logistic regression, L2 penalty on the weights (not the bias), fitted by
    full-batch L-BFGS (optax) from zero: minimises `_objective`. Returns the params."""

    def objective(params):
        return _objective(params, xs, ys, weights, l2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return (optax.apply_updates(params, updates), state), None

    params = {"w": jnp.zeros((xs.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    (params, _), _ = lax.scan(body, (params, solver.init(params)), None, length=iters)
    return params


_fit = jax.jit(_fit_probe, static_argnames=("num_classes", "iters"))

# A fit has converged when no coordinate of the objective's gradient exceeds this: scikit-learn's
# default for its L-BFGS logistic regression, whose objective (the mean loss plus the L2 term)
# is this one. Checked after the fixed `iters` iterations, in a computation of its own, so the
# fitted parameters (and every reported number) are those of the fixed-iteration fit.
GRAD_TOL = 1e-4


@jax.jit
def _grad_max(params, xs, ys, weights, l2):
    """max |gradient| of `_objective` at `params`."""
    grads = jax.grad(_objective)(params, xs, ys, weights, l2)
    return jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))


def _cross_validate(xs, ys, fold: np.ndarray, l2_grid, folds: int, num_classes: int, iters: int):
    """Held-out cross-entropy per penalty, averaged over the folds: each (fold, penalty) fitted
    on the other folds' examples. One compiled fit serves them all (a Python loop: vmapping the
    L-BFGS line search ran slower on CPU than fitting one problem after another)."""
    losses, unconverged = np.zeros((folds, len(l2_grid))), 0
    for f in range(folds):
        train, held = jnp.asarray(fold != f, jnp.float32), jnp.asarray(fold == f, jnp.float32)
        for j, l2 in enumerate(l2_grid):
            signals.check()  # between fits: a signal never lands inside numpy's setitem
            params = _fit(xs, ys, train, l2, num_classes=num_classes, iters=iters)
            losses[f, j] = jnp.sum(held * _probe_loss(params, xs, ys)) / jnp.sum(held)
            unconverged += int(float(_grad_max(params, xs, ys, train, l2)) > GRAD_TOL)
    return losses.mean(0), unconverged


# How a probe's features are fed to it: standardised with the training features' per-dimension
# mean and std, or as they are. Cross-validation picks one (standardising pixel borders that are
# nearly constant blows up their noise; scikit-learn's default leaves features as they are).
PREPROCESSING = ("standardized", "raw")
MAX_WIDEN = 4  # times the penalty grid may grow by 10x past an edge the pick landed on


def _preprocess(train_x: np.ndarray, test_x: np.ndarray, how: str):
    if how == "raw":
        return jnp.asarray(train_x, jnp.float32), jnp.asarray(test_x, jnp.float32)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (
        jnp.asarray((train_x - mean) / std, jnp.float32),
        jnp.asarray((test_x - mean) / std, jnp.float32),
    )


def _choose_penalty(score, grid: list[float], scores: dict) -> tuple[str, float, bool]:
    """(preprocessing, penalty, widened): the pair of PREPROCESSING x `grid` with the lowest
    held-out loss, `score(how, penalties)` scoring those not in `scores` yet. A pick at an edge of
    the grid widens it by 10x past that edge (at most MAX_WIDEN times an edge) and scores again.
    `grid` and `scores` are updated in place."""
    room, widened = {"low": MAX_WIDEN, "high": MAX_WIDEN}, False
    while True:
        for h in PREPROCESSING:
            todo = [v for v in grid if (h, v) not in scores]
            if todo:
                scores.update({(h, v): float(c) for v, c in zip(todo, score(h, todo), strict=True)})
        how, l2 = min(((h, v) for h in PREPROCESSING for v in grid), key=scores.__getitem__)
        edge = "low" if l2 == grid[0] else "high" if l2 == grid[-1] else None
        if edge is None or not room[edge]:
            return how, l2, widened
        room[edge] -= 1
        if edge == "low":
            grid.insert(0, grid[0] / 10)
        else:
            grid.append(grid[-1] * 10)
        widened = True


def linear_probe(
    train_x, train_y, test_x, test_y, num_classes, *, l2_grid, folds, iters, seed, predict=False
) -> dict:
    """Logistic regression on frozen features, its preprocessing and L2 penalty chosen on the
    training set alone.

    Both preprocessings (PREPROCESSING) and every penalty of `l2_grid` are scored by held-out
    cross-entropy in `folds`-fold stratified cross-validation on the training set; the best pair
    wins. When the winning penalty sits at an edge of the grid, the grid is widened by 10x past
    that edge (at most MAX_WIDEN times) and scored again, so the pick is bracketed. With one
    penalty or folds < 2 nothing is chosen: standardised features, the grid's first penalty. The
    probe is then refitted on the whole training set. Every fit is full-batch L-BFGS, `iters`
    iterations from zero (`_fit_probe`), then checked for convergence (max |gradient| <=
    GRAD_TOL), which changes nothing of the fit. Returns {'train_loss', 'train_acc', 'test_loss',
    'test_acc', 'l2', 'preprocessing', 'l2_grid' (as widened), 'cv_loss' (held-out loss per
    penalty of l2_grid for the chosen preprocessing, or None), 'widened' (bool), 'iters',
    'grad_max' and 'converged' (of the final fit), 'cv_fits' and 'cv_unconverged' (the
    cross-validation's fits, and how many of them had not converged)}, and with `predict`
    'test_pred' ((t,) the class per test example, for paired comparisons).
    """
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    ys, yt = jnp.asarray(train_y, jnp.int32), jnp.asarray(test_y, jnp.int32)
    inputs = {}  # each preprocessing's (train, test) arrays, made when first asked for

    def prepared(how: str):
        if how not in inputs:
            inputs[how] = _preprocess(train_x, test_x, how)
        return inputs[how]

    grid, scores = sorted(float(v) for v in l2_grid), {}
    how, l2, widened = PREPROCESSING[0], grid[0], False
    cv = {"fits": 0, "unconverged": 0}  # the cross-validation's fits, and those not converged
    if len(grid) > 1 and folds > 1:
        fold = _stratified_folds(np.asarray(train_y), folds, seed)

        def score(h: str, todo: list[float]) -> np.ndarray:
            loss, unconverged = _cross_validate(
                prepared(h)[0], ys, fold, todo, folds, num_classes, iters
            )
            cv["fits"] += folds * len(todo)
            cv["unconverged"] += unconverged
            return loss

        how, l2, widened = _choose_penalty(score, grid, scores)
    xs, xt = prepared(how)
    signals.check()
    ones = jnp.ones(len(train_y))
    params = _fit(xs, ys, ones, l2, num_classes=num_classes, iters=iters)
    grad_max = float(_grad_max(params, xs, ys, ones, l2))

    def acc(x, y):
        return float(jnp.mean(jnp.argmax(x @ params["w"] + params["b"], -1) == y))

    logits = xt @ params["w"] + params["b"]  # (t, classes)
    pred = {"test_pred": np.asarray(jnp.argmax(logits, -1))} if predict else {}
    return {
        **pred,
        "train_loss": float(jnp.mean(_probe_loss(params, xs, ys))),
        "train_acc": acc(xs, ys),
        "test_loss": float(jnp.mean(_probe_loss(params, xt, yt))),
        "test_acc": acc(xt, yt),
        "l2": l2,
        "preprocessing": how,
        "l2_grid": grid,
        "cv_loss": [scores[(how, v)] for v in grid] if scores else None,
        "widened": widened,
        "iters": iters,
        "grad_max": grad_max,
        "converged": grad_max <= GRAD_TOL,
        "cv_fits": cv["fits"],
        "cv_unconverged": cv["unconverged"],
    }


def convergence_note(res: dict) -> str | None:
    """One line on the fits of a `linear_probe` result that ran out of iterations before they
    converged; None when every fit converged."""
    parts = []
    if not res["converged"]:
        parts.append(
            f"the final fit had not converged after {res['iters']} L-BFGS iterations (max "
            f"|gradient| {res['grad_max']:.1e} > {GRAD_TOL:g})"
        )
    if res["cv_unconverged"]:
        parts.append(
            f"{res['cv_unconverged']} of the {res['cv_fits']} cross-validation fits had not "
            f"converged"
        )
    if not parts:
        return None
    return "; ".join(parts) + ": raise downstream.linear_iters (its accuracy may change)"


def configured_linear_probe(
    config, train_x, train_y, test_x, test_y, num_classes, predict: bool = False
) -> dict:
    """`linear_probe` with the config's settings (downstream.linear_*, the seed's folds)."""
    dc = config.downstream
    return linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes,
        l2_grid=tuple(dc.linear_l2_grid),
        folds=dc.linear_folds,
        iters=dc.linear_iters,
        seed=config.seed,
        predict=predict,
    )
