"""Flax parameter names -> torchvision's ResNet state_dict names (`export.py` writes them): the
encoder's stages and blocks, the projection head's layers, BatchNorm's running statistics and its
`num_batches_tracked`.
"""

import re

import numpy as np
from flax import traverse_util

_BLOCK = re.compile(r"stage(\d+)_block(\d+)")
_HEAD_LAYER = re.compile(r"(dense|bn)(\d+)")
_RENAMED = {
    "stem_conv": "conv1",
    "stem_bn": "bn1",
    "proj_conv": "downsample.0",
    "proj_bn": "downsample.1",
}


def encoder_module(name: str) -> str:
    """A module name inside resnet.ResNet -> torchvision's."""
    block = _BLOCK.fullmatch(name)
    if block:
        return f"layer{block[1]}.{int(block[2]) - 1}"
    return _RENAMED.get(name, name)  # a block's conv1, bn1, ... are torchvision's names already


def head_module(name: str) -> str:
    """dense<i> / bn<i> of networks.ProjectionHead -> its index in the nn.Sequential."""
    layer = _HEAD_LAYER.fullmatch(name)
    if layer is None:
        raise ValueError(f"unexpected projection head entry {name!r}")
    return str(3 * (int(layer[2]) - 1) + (layer[1] == "bn"))


def head_length(kept: int, layers: int, bn_output: bool) -> int:
    """How many modules the nn.Sequential of the projection head's first `kept` of `layers`
    layers holds (each layer below the last: Linear, BN, ReLU; the last: Linear[, BN])."""
    return 3 * min(kept, layers - 1) + (1 + bn_output if kept == layers else 0)


def _torch_entries(module: str, leaves: dict, step: int) -> dict:
    """One flax module's leaves (its params and batch_stats) -> its torch state_dict entries."""
    leaves = dict(leaves)
    if "kernel" in leaves:  # Conv (H, W, I, O) -> (O, I, H, W); Dense (I, O) -> (O, I)
        kernel = leaves.pop("kernel")
        out = {"weight": kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T}
        if "bias" in leaves:
            out["bias"] = leaves.pop("bias")
    else:  # BatchNorm (a BN without centring: bias 0)
        scale = leaves.pop("scale")
        out = {
            "weight": scale,
            "bias": leaves.pop("bias", np.zeros_like(scale)),
            "running_mean": leaves.pop("mean"),
            "running_var": leaves.pop("var"),
            "num_batches_tracked": np.array(step, np.int64),
        }
    if leaves:
        raise ValueError(f"unexpected variables {sorted(leaves)} in {module}")
    return {".".join(filter(None, (module, k))): np.ascontiguousarray(v) for k, v in out.items()}


def state_dict(params, batch_stats, rename, prefix: str = "", step: int = 0) -> dict:
    """{torch key: array} of a flax module's variables (its 'params' and 'batch_stats' trees),
    each submodule named by `rename`, under `prefix`."""
    modules: dict[str, dict] = {}
    for tree in (params, batch_stats):
        for path, value in traverse_util.flatten_dict(dict(tree)).items():
            *names, leaf = path
            module = ".".join(filter(None, (prefix, *map(rename, names))))
            modules.setdefault(module, {})[leaf] = np.asarray(value, np.float32)
    out = {}
    for module, leaves in modules.items():
        out.update(_torch_entries(module, leaves, step))
    return out
