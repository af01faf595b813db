"""The NT-Xent (normalised temperature-scaled cross-entropy) loss of SimCLR, with negatives
drawn from every device, and its contrastive top-1 accuracy.

For a global batch of N images with two views each, the 2N projections are
[z1; z2] (2N, D); with sim the cosine similarity and tau the temperature,

    l(i, j) = -log( exp(sim(i, j) / tau) / sum_{m != i} exp(sim(i, m) / tau) )
    L = 1 / (2N) * sum_{k < N} [ l(k, k + N) + l(k + N, k) ]

Convention under `jax.pmap(..., axis_name='batch')` (each device holds n = N / devices
rows of z1 and z2): every device gathers z1 and z2 from all devices (`lax.all_gather`,
tiled), computes the loss terms of ITS OWN 2n rows against all 2N columns, and divides by
the GLOBAL 2N. The value returned for differentiation is this PER-DEVICE PARTIAL loss;
the partials of all devices sum to L. Because the transpose of `all_gather` is a
reduce-scatter (a sum over devices), `jax.grad` of the partial already gives each device
dL/d(its own z) exactly. The parameters are shared, so their gradients must be SUMMED over
devices, not averaged:

    def loss_fn(params):
        (h, z), new_state = ...                     # z1, z2 (n, D) from local images
        return nt_xent_with_metrics(z1, z2, tau, axis_name='batch')
    (partial, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = lax.psum(grads, 'batch')                # NOT pmean: gives dL/dparams
    # metrics['loss'] == L and metrics['contrastive_acc'] are global (already psummed).

Without `axis_name` (one device, or jit over a global batch) the partial IS L.

What is optimised is `OBJECTIVE_SCALE * L` = 2L, the official code's scale: it minimises
loss_a + loss_b, each a mean over the N rows of one view (google-research/simclr,
`add_contrastive_loss`). The scale matters under LARS: weight decay is added to the gradient
before the trust ratio, and BatchNorm and bias parameters skip the trust ratio, so with L the
decay would weigh twice as much against the gradient and those parameters would move half as
fast as in the official recipe. The metrics report L itself.

Also the distillation loss of SimCLRv2 (Chen et al., 2020, "Big Self-Supervised Models are
Strong Semi-Supervised Learners", eq. 2): `distillation_loss`.
"""

import jax
import jax.numpy as jnp
import optax
from jax import lax

# Added to the self-similarity logit; a finite value (not -inf) keeps exp/grad free of NaN.
LARGE_NUM = 1e9
# The optimised objective is OBJECTIVE_SCALE * L (the official code's loss_a + loss_b).
OBJECTIVE_SCALE = 2.0


def _l2_normalize(z, eps: float = 1e-12):
    """Row-wise unit vectors in float32 (even for bfloat16 z). (n, D) -> (n, D)."""
    z = z.astype(jnp.float32)
    return z * lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps))


def _gather(x, axis_name: str | None):
    """All devices' rows (n * devices, D) and this device's first global row index."""
    if axis_name is None:
        return x, 0
    offset = lax.axis_index(axis_name) * x.shape[0]
    return lax.all_gather(x, axis_name, tiled=True), offset


def _logits_and_labels(z1, z2, temperature, axis_name):
    """Logits of this device's 2n rows against all 2N global columns, self masked, and the
    column of each row's positive. Returns logits (2n, 2N), labels (2n,) int32."""
    z1, z2 = _l2_normalize(z1), _l2_normalize(z2)  # (n, D) each
    n = z1.shape[0]
    all1, offset = _gather(z1, axis_name)  # (N, D)
    all2, _ = _gather(z2, axis_name)  # (N, D)
    big_n = all1.shape[0]
    rows = jnp.concatenate([z1, z2])  # (2n, D); rows [0, n) are view 1, [n, 2n) view 2
    cols = jnp.concatenate([all1, all2])  # (2N, D); columns [0, N) view 1, [N, 2N) view 2
    # float32 matmul at full precision (the TPU default would round to bfloat16).
    logits = jnp.matmul(rows, cols.T, precision=lax.Precision.HIGHEST) / temperature
    local = offset + jnp.arange(n)  # global index of each local example
    self_col = jnp.concatenate([local, big_n + local])  # (2n,)
    pos_col = jnp.concatenate([big_n + local, local])  # (2n,)
    is_self = self_col[:, None] == jnp.arange(2 * big_n)[None, :]  # (2n, 2N)
    logits = jnp.where(is_self, -LARGE_NUM, logits)
    return logits, pos_col


def _psum(x, axis_name: str | None):
    return x if axis_name is None else lax.psum(x, axis_name)


def nt_xent_with_metrics(z1, z2, temperature, axis_name: str | None = None):
    """NT-Xent of this device's rows, and global metrics.

    Args:
      z1, z2: (n, D) projections of the two views of this device's n images (any float
        dtype; computed in float32).
      temperature: tau > 0.
      axis_name: the pmap axis to gather negatives over; None on a single device.

    Returns:
      (partial_loss, metrics). `partial_loss` is this device's share of the global loss L
      (sum of its 2n row losses / global 2N): differentiate it, then `lax.psum` the
      parameter gradients over `axis_name`. `metrics` = {'loss': L, 'contrastive_acc':
      fraction of the 2N global rows whose positive has the highest logit among the 2N - 1
      candidates}, both already summed over devices and without gradient.
    """
    logits, labels = _logits_and_labels(z1, z2, temperature, axis_name)  # (2n, 2N), (2n,)
    global_rows = logits.shape[1]  # 2N
    row_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # (2n,)
    partial_loss = jnp.sum(row_loss) / global_rows
    correct = jnp.argmax(logits, axis=-1) == labels  # (2n,)
    partial_acc = jnp.sum(correct.astype(jnp.float32)) / global_rows
    metrics = {
        "loss": _psum(lax.stop_gradient(partial_loss), axis_name),
        "contrastive_acc": _psum(partial_acc, axis_name),
    }
    return partial_loss, metrics


def nt_xent(z1, z2, temperature, axis_name: str | None = None):
    """The per-device partial NT-Xent loss of `nt_xent_with_metrics`, without metrics.

    On one device (axis_name None) it is the loss L itself. Under pmap the partials sum to
    L: `lax.psum` the gradients of the partial (not pmean) to get dL/dparams.
    """
    return nt_xent_with_metrics(z1, z2, temperature, axis_name)[0]


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """SimCLRv2's eq. 2, as the official code computes it (google-research/simclr,
    tf2/colabs/distillation_self_training.ipynb, `add_kd_loss`): the cross-entropy of the
    student's softmax(s / T) against the teacher's softmax(t / T), no gradient through the
    teacher, scaled by T^2 (which keeps the gradients' size as T changes; 1 at T = 1), averaged
    over the rows. (n, C), (n, C) -> () float32.
    """
    t = lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    per_row = optax.softmax_cross_entropy(s, jax.nn.softmax(t, axis=-1))  # (n,)
    return temperature**2 * jnp.mean(per_row)
