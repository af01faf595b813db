"""A speed trick for XLA:CPU, injected into the ResNet as its convolution (`conv_module`), outside
the architecture: the filter gradient of chosen convolutions computed as GEMMs.

XLA differentiates a convolution with respect to its filter as another convolution, whose
operands it first transposes to [C, H, W, N] and [H, W, N, C]; XLA:CPU fuses the recomputation of
BatchNorm, ReLU and the residual adds into those transposes, and for a few channels over many
pixels they dominate the step (benchmarks/README.md: at width 0.25, 1.4 s of a 2.0 s ResNet-18
step on jaxlib 0.10). Here the forward and the input gradient stay XLA's convolutions and the
filter gradient is a GEMM over shifted copies of the NHWC input: no batch-axis transposes.

Which convolutions win depends on XLA:CPU's own filter gradient, which changed between jaxlib
versions (benchmarks/README.md, "oneDNN convolutions and the GEMM filter gradient on jax 0.12"):

* jaxlib < 0.12 (`narrow`): the GEMM for convolutions of at most NARROW output channels (those
  whose transposes dominate); on wide ones Eigen's filter gradient is faster.
* jaxlib >= 0.12 (`narrow+large`): the same, and also every 1x1 convolution, those with at most
  NARROW input channels (but the stem's images), and 3x3 (or larger) ones with at least
  LARGE_MIN output channels, LARGE_MIN_IN input channels and LARGE_MIN_OUTPUTS output values
  per image, where XLA's filter gradient is now 2-3x slower than the GEMM (the whole ResNet-18
  step at width 1: 25.5 -> 15.0 s). On narrow layers the GEMM still wins inside the network
  (BN, ReLU and the residual adds fuse into XLA's transposes: 1.10x on the width-0.25 step for
  the narrow inputs), though not when such a convolution is timed alone.

`conv_module` applies the installed jaxlib's rule on the CPU only (GPU and TPU keep nn.Conv);
SIMCLR_JAX_GEMM_FILTER_GRAD=narrow|narrow+large|none overrides it (for A/B runs). Parameters are
nn.Conv's either way, and so are the gradients, up to float32 rounding.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from simclr_jax.runtime import xla

NARROW = 32  # output channels up to which the GEMM filter gradient is used (both rules)
LARGE_MIN = 64  # `narrow+large`: output channels from which a 3x3 convolution uses it too ...
LARGE_MIN_IN = 8  # ... with this many input channels (the stem's 3 or 1 never) ...
LARGE_MIN_OUTPUTS = 16384  # ... and output values per image (Ho * Wo * Cout)
RULES = ("narrow", "narrow+large", "none")
RULE_ENV = "SIMCLR_JAX_GEMM_FILTER_GRAD"
LARGE_JAXLIB = (0, 12)  # `narrow+large` from this jaxlib on (0.12.0 measured)


def _nhwc(lhs_shape, rhs_shape) -> lax.ConvDimensionNumbers:
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))


def _xla_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_nhwc(x.shape, kernel.shape)
    )


def _contract_rows(a, b):
    """a (M, P), b (M, Q) -> a^T b (P, Q), accumulated in float32 (M is the long axis); a is the
    narrow operand, the orientation XLA:CPU's GEMM runs fastest."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _stack_channels(parts):
    """[(N, H, W, C)] * k -> (N, H, W, k*C), part-major (a stack on a new axis, then a reshape:
    whole channel rows are copied, faster on XLA:CPU than a concatenate on the channel axis)."""
    if len(parts) == 1:
        return parts[0]
    return jnp.stack(parts, axis=-2).reshape(*parts[0].shape[:-1], -1)


def conv_filter_grad(x, g, kernel_shape, strides, padding):
    """d(sum(conv(x, k) * g)) / dk for an NHWC / HWIO convolution, as GEMMs.

    x: (N, H, W, Cin), g: (N, Ho, Wo, Cout) -> (KH, KW, Cin, Cout) float32. Stride 1 on maps of
    at least 4 * (KH - 1) rows: the KW column shifts of x and the KH row shifts of g stacked on
    the channel axis, one GEMM (KH*Cout, M) x (M, KW*Cin), M = N*(H+pads)*Wo. Otherwise
    (strided, 1x1, small maps): im2col, the KH*KW (strided) taps of x on the channel axis.
    """
    kh, kw, cin, cout = kernel_shape
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, ho, wo, _ = g.shape
    hp = xp.shape[1]
    if (sh, sw) == (1, 1) and kh * kw > 1 and 4 * (kh - 1) <= ho:
        xs = _stack_channels([xp[:, :, j : j + wo] for j in range(kw)])  # (N, Hp, Wo, KW*Cin)
        rows = [((0, 0), (i, hp - ho - i), (0, 0), (0, 0)) for i in range(kh)]
        gs = _stack_channels([jnp.pad(g, r) for r in rows])  # (N, Hp, Wo, KH*Cout)
        d = _contract_rows(gs.reshape(-1, kh * cout), xs.reshape(-1, kw * cin))
        return d.reshape(kh, cout, kw, cin).transpose(0, 2, 3, 1)
    end = (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, cin)
    taps = [
        lax.slice(xp, (0, i, j, 0), (end[0], i + end[1], j + end[2], cin), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    patches = _stack_channels(taps)  # (N, Ho, Wo, KH*KW*Cin)
    d = _contract_rows(g.reshape(-1, cout), patches.reshape(-1, kh * kw * cin))  # (Cout, K)
    return d.T.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gemm_conv(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding)


def _gemm_conv_fwd(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _gemm_conv_bwd(strides, padding, res, g):
    x, kernel = res
    (dx,) = jax.linear_transpose(lambda t: _xla_conv(t, kernel, strides, padding), x)(g)
    dk = conv_filter_grad(x, g, kernel.shape, strides, padding)
    return dx, dk.astype(kernel.dtype)


_gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def uses_gemm(rule: str, lhs_shape, rhs_shape, strides, padding) -> bool:
    """Whether `rule` (RULES) gives an NHWC x HWIO convolution the GEMM filter gradient."""
    kh, kw, cin, cout = rhs_shape
    if rule == "none":
        return False
    if cout <= NARROW:
        return True
    if rule == "narrow":
        return False
    if kh == kw == 1 or LARGE_MIN_IN <= cin <= NARROW:  # narrow+large: 1x1s and narrow inputs
        return True
    (pt, pb), (pl, pr) = padding
    ho = (lhs_shape[1] + pt + pb - kh) // strides[0] + 1
    wo = (lhs_shape[2] + pl + pr - kw) // strides[1] + 1
    return cout >= LARGE_MIN and cin >= LARGE_MIN_IN and ho * wo * cout >= LARGE_MIN_OUTPUTS


def gemm_grad_conv(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
    dimension_numbers=None, feature_group_count=1, precision=None, rule="narrow", **unused,
):  # fmt: skip
    """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: the same forward and
    input gradient, with the GEMM filter gradient where `rule` says so (`uses_gemm`); XLA's own
    convolution for the rest and for anything but a plain NHWC/HWIO 2-D convolution."""
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    plain = (
        not dilated
        and feature_group_count == 1
        and lhs.ndim == 4
        and lax.ConvDimensionNumbers(*dimension_numbers) == _nhwc(lhs.shape, rhs.shape)
    )
    if plain:
        strides = tuple(int(s) for s in window_strides)
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        if uses_gemm(rule, lhs.shape, rhs.shape, strides, padding):
            return _gemm_conv(lhs, rhs, strides, padding)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision,
    )  # fmt: skip


def default_rule(environ=os.environ) -> str:
    """RULE_ENV if set, else the installed jaxlib's rule (module docstring)."""
    wanted = environ.get(RULE_ENV, "")
    if wanted:
        if wanted not in RULES:
            raise ValueError(f"{RULE_ENV}={wanted}: expected one of {', '.join(RULES)} (or unset)")
        return wanted
    return "narrow+large" if xla.jaxlib_version() >= LARGE_JAXLIB else "narrow"


def conv_module(backend: str | None = None, rule: str | None = None):
    """The convolution to inject into the ResNet (`networks.build_model(..., conv=...)`): on CPU,
    nn.Conv with `gemm_grad_conv` under `rule` (default: `default_rule()`); elsewhere (GPU, TPU)
    plain nn.Conv."""
    if (backend or jax.default_backend()) != "cpu":
        return nn.Conv
    rule = rule or default_rule()
    if rule == "none":
        return nn.Conv
    conv = functools.partial(gemm_grad_conv, rule=rule)
    return functools.partial(nn.Conv, conv_general_dilated=conv)
