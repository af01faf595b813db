"""Export to PyTorch: a run's encoder f as a safetensors file in torchvision's ResNet key layout,
and a JSON beside it with what a loader needs (docs/pytorch.md: the PyTorch side).

    python -m simclr_jax.export RUN OUT.safetensors [--head] [--classifier NAME] [--overwrite]

RUN is what `load_encoder` reads (a workdir, its checkpoints/pretrain directory, an
encoder.msgpack); with `--classifier NAME` (a downstream run: finetune, scratch, finetune_long,
scratch_long) a workdir, whose checkpoints/NAME hold that classifier: its own f (fine-tuned, or
trained from scratch) and its head are exported instead of the pretrained f.

The keys are those of a torch `state_dict`:

* f, as torchvision's ResNet: `conv1`, `bn1` (the stem), `layer<i>.<j>.conv1` / `bn1` / `conv2` /
  `bn2` [/ `conv3` / `bn3`] [/ `downsample.0` / `downsample.1`] (flax's `stage<i>_block<j+1>` and
  its `proj_conv` / `proj_bn`); conv kernels OIHW (flax: HWIO); each BN's `weight`, `bias`,
  `running_mean`, `running_var` and `num_batches_tracked` (the checkpoint's step; 0 from an
  encoder.msgpack, which records none; PyTorch reads it only with momentum=None).
* `--head`: the projection head g as `head.<n>`, n its index in
  nn.Sequential([Linear(bias=False), BatchNorm1d, ReLU] * (L - 1), Linear(bias=False)[,
  BatchNorm1d]): flax's `dense<i>` is `head.<3(i-1)>`, `bn<i>` `head.<3(i-1)+1>`. The BN on z
  (model.head_bn_output) has no bias in flax: it is written as zeros, the same function.
* `--classifier`: `fc` is the classifier's linear layer (`fc.weight`, `fc.bias`, as torchvision's
  own fc), or, where the run kept the projection head's first k layers
  (downstream.ft_proj_selector = k > 0), nn.Sequential(those k layers as in `head.<n>`, Linear)
  as `fc.<n>`.

The JSON (also in the safetensors header, under 'simclr_jax') says how to build the network and
feed it: `arch`, `block`, `layers`, `width`, `base_channels` (int(64 * width)), `stem` ('cifar':
3x3 stride-1 conv, no max-pool; 'imagenet': torchvision's 7x7 stride 2 + max-pool),
`feature_dim`, `input_size`, `mean` / `std` per channel for pixels in [0, 1], the BN `bn_eps`
and `bn_momentum` (torch's convention), `projection_head` and `classifier`.

Only torchvision's ResNets export (resnet18, resnet34, resnet50). At width 1 (64 base channels)
they load into stock `torchvision.models.<arch>`; at any width into docs/pytorch.md's builder
(torchvision's modules at `base_channels`, the same keys).
"""

import argparse
import json
import logging
import os
import sys

from safetensors.numpy import save

from simclr_jax import pretrained, torch_layout
from simclr_jax.core import networks, resnet
from simclr_jax.core.networks import ft_proj_selector
from simclr_jax.data import dataset
from simclr_jax.errors import CheckpointError, UserError
from simclr_jax.runtime.files import checkpoint_dir
from simclr_jax.train import classifier
from simclr_jax.train.checkpoint import Checkpointer, has_steps
from simclr_jax.train.state import checked_restore
from simclr_jax.train.supervised import CLASSIFIER_RUNS

SUFFIX = ".safetensors"
FORMAT = "simclr-jax torchvision-resnet 1"  # the JSON's layout version
ARCHS = ("resnet18", "resnet34", "resnet50")  # resnet.MODELS that torchvision has


def _check_out(out: str, overwrite: bool) -> str:
    """The JSON's path beside OUT; UserError where OUT is not a .safetensors path, or where it
    or its JSON exist and `overwrite` is not set."""
    if not out.endswith(SUFFIX) or out == SUFFIX:
        raise UserError(
            f"OUT {out!r} must be a file name ending in {SUFFIX} (e.g. encoder{SUFFIX})."
        )
    json_path = out[: -len(SUFFIX)] + ".json"
    for path in (out, json_path):
        if os.path.isdir(path):
            raise UserError(f"{path} is a directory: choose another OUT.")
        if os.path.exists(path) and not overwrite:
            raise UserError(
                f"{path} exists: pass --overwrite to replace it, or choose another OUT."
            )
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the folder that would hold the ones made for OUT
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"Cannot write OUT {out!r} under {parent}: choose another OUT.")
    return json_path


def _check_architecture(config) -> resnet.ResNet:
    """The run's f (unbound); UserError for an architecture torchvision has no ResNet for."""
    name = config.model.name
    if name not in ARCHS:
        raise UserError(
            f"model {name!r} has no torchvision ResNet to export to (its layout is not "
            f"torchvision's): export supports {', '.join(ARCHS)}."
        )
    return networks.build_encoder(config.model)


def _classifier_run(run: str, name: str):
    """(config, variables, step, source) of the newest checkpoint of downstream run `name` in the
    workdir `run`; UserError before anything is read where there is none."""
    if name not in CLASSIFIER_RUNS:
        raise UserError(f"--classifier {name!r}: choose one of {', '.join(CLASSIFIER_RUNS)}.")
    config = pretrained.read_config(run)
    _check_architecture(config)
    directory = checkpoint_dir(run, name)
    if not has_steps(directory):
        present = [r for r in CLASSIFIER_RUNS if has_steps(checkpoint_dir(run, r))]
        raise CheckpointError(
            f"{directory} holds no checkpoint: run --mode=downstream with --workdir {run} first"
            + (f", or export one of the runs it holds ({', '.join(present)})." if present else ".")
        )
    ckpt = Checkpointer(directory, create=False, async_save=False)
    try:
        num_classes = ckpt.shapes(ckpt.steps()[-1])["params"]["head"]["kernel"][-1]
        found = checked_restore(ckpt, classifier.abstract_tree(config, num_classes), config)
    finally:
        ckpt.close()
    if found is None:
        raise CheckpointError(f"No readable checkpoint of the classifier run in {directory}.")
    tree, _, step = found
    return config, tree, int(step), directory


def _head_spec(config, f: resnet.ResNet) -> dict:
    m = config.model
    return {
        "layers": int(m.head_layers),
        "hidden_dim": int(m.head_hidden_dim or f.feat_dim),
        "out_dim": int(m.proj_dim),
        "bn_output": bool(m.get("head_bn_output", False)),
    }


def _describe(config, f: resnet.ResNet, *, head: bool, fc: dict | None, source, step) -> dict:
    """The JSON beside the export: what a loader needs to build the network and feed it."""
    mean, std = dataset.input_stats(config)
    return {
        "format": FORMAT,
        "arch": config.model.name,
        "block": f.block_cls.__name__,  # torchvision's class names: BasicBlock, Bottleneck
        "layers": list(f.stage_sizes),
        "width": float(config.model.width),
        "base_channels": f.base_filters,
        "stock_torchvision": f.base_filters == 64,  # else: docs/pytorch.md's builder
        "stem": config.model.stem,
        "feature_dim": f.feat_dim,
        "input_size": int(config.data.image_size),
        "mean": [float(x) for x in mean],  # per channel, for pixels in [0, 1]
        "std": [float(x) for x in std],
        "bn_eps": resnet.BN_EPSILON,
        "bn_momentum": round(1.0 - resnet.BN_MOMENTUM, 6),  # torch's: the batch's weight
        "projection_head": {**_head_spec(config, f), "exported": head},
        "classifier": fc,
        "precision": config.precision,  # of the run; the export is float32
        "source": source,
        "step": step,
    }


def _classifier_head(variables, spec: dict, config, step: int) -> tuple[dict, dict]:
    """({torch key: array} of a classifier's fc, its description in the JSON): the projection
    head's first k = ft_proj_selector layers (the Classifier's 'proj') then the linear layer, as
    fc.<n>; the linear layer alone, as fc, where k = 0."""
    params, stats, kept = variables["params"], variables["batch_stats"], ft_proj_selector(config)
    tensors = {}
    if kept:
        tensors = torch_layout.state_dict(
            params["proj"], stats["proj"], torch_layout.head_module, "fc", step
        )
    length = torch_layout.head_length(kept, spec["layers"], spec["bn_output"])
    tensors |= torch_layout.state_dict(
        params["head"], {}, torch_layout.head_module, f"fc.{length}" if kept else "fc"
    )
    num_classes, in_dim = params["head"]["kernel"].shape[::-1]  # (in, out) -> (out, in)
    return tensors, {
        "num_classes": int(num_classes),
        "kept_head_layers": kept,
        "in_dim": int(in_dim),
    }


def export(
    run: str, out: str, *, head: bool = False, classifier_run: str = "", overwrite: bool = False
) -> dict:
    """Writes OUT (safetensors) and its JSON beside it; returns the JSON's content. Every bad
    input is a UserError raised before anything is written."""
    run, out = os.path.expanduser(run), os.path.expanduser(out)
    json_path = _check_out(out, overwrite)
    if classifier_run and head:
        raise UserError(
            "--head and --classifier exclude each other: a classifier holds the projection head "
            "layers it kept (in fc); export the pretrained encoder with --head separately."
        )
    if classifier_run:
        config, variables, step, source = _classifier_run(run, classifier_run)
    else:
        enc = pretrained.load_encoder(run)
        config, variables, step, source = enc.config, enc.variables, enc.step, enc.source
    f = _check_architecture(config)
    params, stats = variables["params"], variables["batch_stats"]
    step_bn = step or 0
    tensors = torch_layout.state_dict(
        params["encoder"], stats["encoder"], torch_layout.encoder_module, step=step_bn
    )
    fc = None
    if head:
        tensors |= torch_layout.state_dict(
            params["head"], stats["head"], torch_layout.head_module, "head", step_bn
        )
    if classifier_run:
        fc_tensors, fc = _classifier_head(variables, _head_spec(config, f), config, step_bn)
        tensors |= fc_tensors
        fc["run"] = classifier_run
    meta = _describe(config, f, head=head, fc=fc, source=source, step=step)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # Both written whole before either replaces what was there (with --overwrite).
    # safetensors' save_file makes its file private (0600); written here, it gets the JSON's mode.
    with open(out + ".tmp", "wb") as file:
        file.write(save(tensors, metadata={"simclr_jax": json.dumps(meta)}))
    with open(json_path + ".tmp", "w") as file:
        json.dump(meta, file, indent=2)
    os.replace(out + ".tmp", out)
    os.replace(json_path + ".tmp", json_path)
    return meta


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage first)
        self.exit(2, f"error: {message} (python -m simclr_jax.export --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m simclr_jax.export",
        description="Export a run's encoder to PyTorch: safetensors in torchvision's ResNet key "
        "layout, and a JSON beside it (docs/pytorch.md).",
    )
    p.add_argument(
        "run", metavar="RUN", help="a workdir, its checkpoints/pretrain, encoder.msgpack"
    )
    p.add_argument("out", metavar="OUT", help=f"the file to write, ending in {SUFFIX}")
    p.add_argument("--head", action="store_true", help="also the projection head g (head.*)")
    p.add_argument(
        "--classifier",
        default="",
        metavar="NAME",
        help=f"the downstream run NAME's classifier instead ({', '.join(CLASSIFIER_RUNS)})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT and its JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's chatter at INFO
    logging.getLogger("simclr_jax").setLevel(logging.INFO)
    try:
        meta = export(
            args.run,
            args.out,
            head=args.head,
            classifier_run=args.classifier,
            overwrite=args.overwrite,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    what = f"classifier {args.classifier}" if args.classifier else "encoder f"
    loads = "torchvision" if meta["stock_torchvision"] else "docs/pytorch.md's builder"
    print(
        f"Wrote {args.out} ({what} of {meta['source']}, step {meta['step']}; {meta['arch']} width "
        f"{meta['width']}, {meta['stem']} stem: loads into {loads}) and its JSON."
    )


if __name__ == "__main__":
    main()
