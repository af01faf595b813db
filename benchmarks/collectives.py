"""The pretrain step's cross-device traffic, read off its compiled program: every all-reduce and
all-gather (count, elements, bytes per device per step), on simulated CPU devices. What bounds the
step's scaling beyond one device: the gradients' all-reduce (the parameters' size), global BN's
small all-reduces (two statistics per BN layer, forward and backward: latency-bound), and the
all-gather of z for the global negatives.

  python benchmarks/collectives.py --devices 8                 # the CIFAR recipe, 512 / 8 a device
  python benchmarks/collectives.py --devices 8 --set model.name=tiny --batch 32   # (the test's)

It counts operations in the optimised HLO; it times nothing (simulated devices share the CPU).
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "u8": 1, "pred": 1, "s8": 1}
_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"(f32|bf16|f16|s32|u32|u8|pred|s8)\[([0-9,]*)\]")


def collectives(hlo: str) -> dict:
    """{op: {'count', 'elements', 'bytes'}} of the collectives in HLO text (each operation's
    result shapes, a tuple's parts summed). XLA's combiners merge the gradients' and global BN's
    means into shared tuple all-reduces, so the parts are not told apart here."""
    out = {}
    for line in hlo.splitlines():
        op = next((o for o in _OPS if f" {o}(" in line or f" {o}-start(" in line), None)
        if op is None or " = " not in line:
            continue
        lhs = re.split(rf" {op}(?:-start)?\(", line, maxsplit=1)[0].split(" = ", 1)[1]
        row = out.setdefault(op, {"count": 0, "elements": 0, "bytes": 0})
        row["count"] += 1
        for dtype, dims in _SHAPE.findall(lhs):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            row["elements"] += n
            row["bytes"] += n * _BYTES[dtype]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--config", default="configs/cifar_simclr.py")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    p.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--out", default="", help="write the JSON here too")
    args = p.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import recipe_run

    from simclr_jax.runtime import parallel
    from simclr_jax.stages import pretrain

    rargs = recipe_run.parse_args(["--config", args.config, "--precision", args.precision])
    rargs.set = args.set
    config = recipe_run.load_config(rargs)
    if args.batch:
        config.pretrain.batch_size = args.batch
    config.data.mean, config.data.std = (0.5,) * 3, (0.25,) * 3  # shapes only: no data read
    n, size = config.pretrain.batch_size, config.data.image_size
    p_step, state = pretrain.step_and_initial_state(config, 100, 1000)
    per = n // jax.device_count()
    images = jnp.zeros((jax.local_device_count(), per, size, size, 3), jnp.uint8)
    ids = jnp.zeros((jax.local_device_count(), per), jnp.int32)
    key = parallel.replicate(jax.random.key_data(jax.random.key(0)))
    hlo = p_step.lower(parallel.replicate(state), {"images": images, "ids": ids}, key)
    ops = collectives(hlo.compile().as_text())
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    result = {
        "devices": jax.device_count(),
        "global_batch": n,
        "model": config.model.name,
        "width": config.model.width,
        "precision": args.precision,
        "params": params,
        "collectives": ops,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
