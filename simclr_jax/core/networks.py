"""Networks: the ResNet encoder f (x -> h), the projection head g (h -> z), the classifier.

This module owns the architectures only; the NT-Xent loss lives in `losses.py`.

* `ResNet`: CIFAR stem (3x3 conv, stride 1, no max-pool) or ImageNet stem (7x7 conv,
  stride 2, 3x3 max-pool); `BasicBlock` (ResNet-18/34) or `Bottleneck` (ResNet-50).
  Input: normalised images (B, H, W, 3) (`data.normalize`: the input pipeline normalises
  with the statistics of the dataset at hand); output: h (B, feat_dim), float32.
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
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

STEMS = ("cifar", "imagenet")

ModuleDef = Any

# He init (fan_out), as torchvision's ResNet; BN follows every conv so the scale matters little.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding k // 2, as in the reference ResNet ('SAME' pads stride-2 convs
    asymmetrically)."""
    p = kernel // 2
    return ((p, p), (p, p))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). (B, H, W, C_in) -> (B, H/s, W/s, filters)."""

    expansion: ClassVar[int] = 1
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last: bool = True

    @nn.compact
    def __call__(self, x):
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
        # Zero-init of the last BN scale: the block starts as the identity (Goyal et al.).
        y = self.norm(scale_init=last_scale, name="bn2")(y)
        return nn.relu(_shortcut(self, x, y) + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs (ResNet-50). Output channels: 4 * filters."""

    expansion: ClassVar[int] = 4
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last: bool = True

    @nn.compact
    def __call__(self, x):
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        # Stride on the 3x3 conv (ResNet v1.5, as the SimCLR and Flax references).
        y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y)
        y = self.norm(scale_init=last_scale, name="bn3")(y)
        return nn.relu(_shortcut(self, x, y) + y)


def _shortcut(block: nn.Module, x, y):
    """Identity, or a strided 1x1 conv + BN where the shape changes. Called inside the
    block's compact `__call__`, so the projection's params belong to the block."""
    if x.shape == y.shape:
        return x
    x = block.conv(y.shape[-1], (1, 1), block.strides, name="proj_conv")(x)
    return block.norm(name="proj_bn")(x)


class ResNet(nn.Module):
    """ResNet encoder f: normalised images (B, H, W, 3) -> h (B, feat_dim) float32."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_filters: int = 64  # channels of the first stage at width 1
    width: float = 1  # channel multiplier (SimCLR's ResNet-50 (2x), ...)
    stem: str = "cifar"  # 'cifar' (3x3/1, no pool) or 'imagenet' (7x7/2 + max-pool)
    zero_init_residual: bool = True
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_cls: ModuleDef = nn.Conv  # injected: a speed trick with nn.Conv's parameters (cpu_conv)

    @property
    def base_filters(self) -> int:
        base = int(self.num_filters * self.width)
        if base < 1:
            raise ValueError(f"num_filters * width = {self.num_filters * self.width} < 1")
        return base

    @property
    def feat_dim(self) -> int:
        """Size of h: channels of the last stage."""
        return self.base_filters * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(
            self.conv_cls,
            use_bias=False,
            kernel_init=conv_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        norm = _batch_norm(train, self.bn_axis_name, self.dtype)
        x = self._stem(x.astype(jnp.float32), conv, norm)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    filters=self.base_filters * 2**i,
                    conv=conv,
                    norm=norm,
                    strides=2 if i > 0 and j == 0 else 1,
                    zero_init_last=self.zero_init_residual,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        # Global average pool, in float32 whatever the compute dtype.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, feat_dim)

    def _stem(self, x, conv: ModuleDef, norm: ModuleDef):
        """(B, H, W, 3) -> (B, H, W, C) for CIFAR, (B, H/4, W/4, C) for ImageNet (STEMS; the
        config is checked before any model is built)."""
        if self.stem == "cifar":
            x = conv(self.base_filters, (3, 3), padding=_pad(3), name="stem_conv")(x)
            return nn.relu(norm(name="stem_bn")(x))
        x = conv(self.base_filters, (7, 7), (2, 2), padding=_pad(7), name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))


BN_MOMENTUM = 0.9  # running statistic = m * running + (1 - m) * batch's
BN_EPSILON = 1e-5  # torch's BatchNorm default as well


def _batch_norm(train: bool, axis_name: str | None, dtype: Any) -> Callable[..., nn.Module]:
    """BN as in the Flax ImageNet example; with `axis_name` the statistics are global over
    the pmapped devices. Params and running statistics stay float32."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


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
        norm = _batch_norm(train, self.bn_axis_name, self.dtype)
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


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
# For tests: two stages of one BasicBlock, 8 then 16 channels; feat_dim 16.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8)

MODELS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50, "tiny": ResNetTiny}


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
