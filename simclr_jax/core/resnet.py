"""The ResNet encoder f: images -> h, and its BatchNorm (cross-device with an axis name).

* `ResNet`: CIFAR stem (3x3 conv, stride 1, no max-pool) or ImageNet stem (7x7 conv, stride 2,
  3x3 max-pool); `BasicBlock` (ResNet-18/34) or `Bottleneck` (ResNet-50). Input: normalised images
  (B, H, W, 3); output: h (B, feat_dim), float32. `MODELS` names them for `model.name`.

Mixed precision: `dtype` is the computation dtype of the convs; parameters are float32, BN
statistics are reduced in float32 (flax's default), and h comes back as float32. Cross-device BN:
with `bn_axis_name` and the model applied inside `jax.pmap(..., axis_name=...)`, BN statistics
are averaged over every device's batch.
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
        norm = batch_norm(train, self.bn_axis_name, self.dtype)
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


def batch_norm(train: bool, axis_name: str | None, dtype: Any) -> Callable[..., nn.Module]:
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


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)


ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)


# For tests: two stages of one BasicBlock, 8 then 16 channels; feat_dim 16.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8)


MODELS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50, "tiny": ResNetTiny}
