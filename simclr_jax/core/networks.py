"""Networks: the ResNet encoder f (x -> h), the projection head g (h -> z), the classifier.

This module owns the architectures only; the NT-Xent loss lives in `losses.py`.

* `ResNet` (core/resnet.py, named in `MODELS`): f, normalised images (B, H, W, 3) -> h (B,
  feat_dim), float32 (the input pipeline normalises with the statistics of the dataset at hand).
* `ProjectionHead`: [Dense -> BN -> ReLU] * (num_layers - 1) -> Dense(out_dim).
* `SimCLRModel`: `__call__(x, train) -> (h, z)`.
* `Classifier`: `__call__(x, train) -> logits` (B, num_classes), optionally with the first
  head layers kept between f and its linear layer (`proj`, SimCLRv2's `ft_proj_selector`).
* `online_probe_head`: pretraining's online linear head, h -> logits (`pretrain.online_probe`).

Both `SimCLRModel` and `Classifier` hold the encoder under the same name, 'encoder', so
`variables['params']['encoder']` and `variables['batch_stats']['encoder']` of a pretrained
`SimCLRModel` drop straight into a `Classifier`. Both have `encode(x, train) -> h` for
feature extraction (linear probe, kNN):

    h = model.apply(variables, x, train=False, method='encode')

Mixed precision: `dtype` is the computation dtype of convs / denses (bfloat16 on TPU);
parameters are always float32, BN statistics are reduced in float32 (flax's default), and
h, z, logits come back as float32.

Cross-device BN: with `bn_axis_name='batch'` and the model applied inside
`jax.pmap(..., axis_name='batch')`, BN statistics are averaged over every device's batch.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.core.resnet import MODELS, ModuleDef, ResNet, batch_norm


class ProjectionHead(nn.Module):
    """Projection head g: h (B, F) -> z (B, out_dim) float32.

    `__call__(h, train, layers=k)` runs the first k layers only (0: h itself), with the same
    parameter names (dense1, bn1, ...): the official code's `hiddens_list[k]`, what SimCLRv2's
    `ft_proj_selector` fine-tunes from. Layers below the last end in BN + ReLU, the last (k =
    num_layers) is z.
    """

    num_layers: int = 2
    hidden_dim: int = 0  # 0: same as the input feature dim F
    out_dim: int = 128
    bn_output: bool = False  # BN (no centring) on z, as the official SimCLR code's head
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool, layers: int | None = None):
        layers = self.num_layers if layers is None else layers
        if not 0 <= layers <= self.num_layers:
            raise ValueError(f"layers must be in 0..{self.num_layers}, got {layers}")
        norm = batch_norm(train, self.bn_axis_name, self.dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        hidden = self.hidden_dim or h.shape[-1]
        x = h
        for i in range(min(layers, self.num_layers - 1)):
            # No bias: the BN that follows has its own.
            x = dense(hidden, use_bias=False, name=f"dense{i + 1}")(x)  # (B, hidden)
            x = nn.relu(norm(name=f"bn{i + 1}")(x))
        if layers < self.num_layers:
            return x.astype(jnp.float32)  # (B, hidden), or h (B, F) at layers = 0
        # No bias on z either: NT-Xent is blind to a bias shared by every z except through the
        # normalisation, its gradient is ~1/|z| and LARS does not scale it (biases skip the trust
        # ratio), so a bias here blows up in a step or two and collapses every z onto it.
        x = dense(self.out_dim, use_bias=False, name=f"dense{self.num_layers}")(x)
        if self.bn_output:
            x = norm(use_bias=False, name=f"bn{self.num_layers}")(x)
        return x.astype(jnp.float32)  # (B, out_dim)


class SimCLRModel(nn.Module):
    """f then g. `__call__(x, train) -> (h, z)`; `encode(x, train) -> h`; `features(x, train,
    layer)`: the output of the first `layer` head layers (0: h)."""

    encoder: nn.Module
    head: nn.Module

    def __call__(self, x, train: bool):
        h = self.encoder(x, train)  # (B, F)
        z = self.head(h, train)  # (B, out_dim)
        return h, z

    def encode(self, x, train: bool = False):
        return self.encoder(x, train)

    def features(self, x, train: bool = False, layer: int = 0):
        h = self.encoder(x, train)  # (B, F)
        return h if layer == 0 else self.head(h, train, layers=layer)


class Classifier(nn.Module):
    """f, the first head layers kept (`proj`, optional), then a linear layer. `__call__(x, train)
    -> logits` (B, num_classes) float32; `encode(x, train) -> h`; `features(x, train)`: what the
    linear layer reads. The encoder is named 'encoder', as in `SimCLRModel`.

    `proj` (SimCLRv2's fine-tuning from a projection-head layer): a `ProjectionHead` of which the
    first `proj_layers` layers run, under the name 'proj' with the head's own layer names, so
    the pretrained head's first layers copy over by name; with proj_layers = 0 there is none.

    The head starts at zero, as the official code's `zero_init_logits_layer` for fine-tuning:
    the first updates reach the head only (dL/dh = W^T (p - y) = 0), so fine-tuning begins by
    fitting a linear classifier on f instead of sending a random head's gradients through it.
    """

    encoder: nn.Module
    num_classes: int
    proj: nn.Module | None = None
    proj_layers: int = 0

    @nn.compact
    def __call__(self, x, train: bool):
        # float32 logits for a stable cross-entropy under mixed precision.
        head = nn.Dense(
            self.num_classes, dtype=jnp.float32, kernel_init=nn.initializers.zeros, name="head"
        )
        return head(self.features(x, train))

    def encode(self, x, train: bool = False):
        return self.encoder(x, train)

    def features(self, x, train: bool = False):
        h = self.encoder(x, train)  # (B, F) float32
        if self.proj_layers == 0:
            return h
        return self.proj(h, train, layers=self.proj_layers)  # (B, hidden) or (B, out_dim)


def build_encoder(
    model_cfg, bn_axis_name: str | None = None, dtype: Any = jnp.float32, conv: ModuleDef = nn.Conv
) -> ResNet:
    """The ResNet named by `model_cfg.name` (a key of MODELS), with its `width` and `stem`
    (the config checks both: `config.validate`); `conv` replaces nn.Conv (same parameters)."""
    return MODELS[model_cfg.name](
        width=model_cfg.width,
        stem=model_cfg.stem,
        zero_init_residual=getattr(model_cfg, "zero_init_residual", True),
        bn_axis_name=bn_axis_name,
        dtype=dtype,
        conv_cls=conv,
    )


def build_model(
    model_cfg,
    num_classes: int | None = None,
    bn_axis_name: str | None = None,
    dtype=jnp.float32,
    conv: ModuleDef = nn.Conv,
    proj_layers: int = 0,
) -> nn.Module:
    """`SimCLRModel` when `num_classes` is None, else `Classifier` (with the first `proj_layers`
    layers of the projection head between f and its linear layer).

    `model_cfg` needs `name` (a key of MODELS), `width`, `stem`, `head_layers`,
    `head_hidden_dim` (0: feat_dim), `proj_dim`; optional `zero_init_residual` (True),
    `head_bn_output` (False). `conv` replaces the encoder's nn.Conv (same parameters).
    """
    encoder = build_encoder(model_cfg, bn_axis_name, dtype, conv)
    head = ProjectionHead(
        num_layers=model_cfg.head_layers,
        hidden_dim=model_cfg.head_hidden_dim,
        out_dim=model_cfg.proj_dim,
        bn_output=getattr(model_cfg, "head_bn_output", False),
        bn_axis_name=bn_axis_name,
        dtype=dtype,
    )
    if num_classes is None:
        return SimCLRModel(encoder=encoder, head=head)
    if not 0 <= proj_layers <= head.num_layers:
        raise ValueError(f"proj_layers must be in 0..{head.num_layers}, got {proj_layers}")
    proj = head if proj_layers else None
    return Classifier(encoder=encoder, num_classes=num_classes, proj=proj, proj_layers=proj_layers)


def online_probe_head(num_classes: int) -> nn.Dense:
    """Pretraining's online linear head: h (B, F) -> logits (B, num_classes), float32. Its kernel
    starts as the official code's supervised head's (normal, stddev 0.01), its bias at zero."""
    return nn.Dense(num_classes, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01))


def ft_proj_selector(config) -> int:
    """Which features the downstream stage reads: 0 = h, k = the output of the projection head's
    first k layers (downstream.ft_proj_selector; -1 = model.head_layers, the official code's 'last
    layer'; 0 in configs written before it existed)."""
    return resolve_selector(
        (config.get("downstream") or {}).get("ft_proj_selector", 0), config.model.head_layers
    )


def resolve_selector(k: int, head_layers: int) -> int:
    """A selector with -1 read as `head_layers` (z), the official code's meaning."""
    return int(head_layers) if int(k) == -1 else int(k)
