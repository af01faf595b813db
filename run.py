"""SimCLR in JAX: `python run.py --config configs/cifar_simclr.py [--workdir DIR] [--mode=...]`.

Config values are overridden with --config.section.key=value (unknown keys are refused).
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    "configs/digits_simclr.py",
    "Path to a config file with get_config().",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_MODE = flags.DEFINE_enum("mode", "all", ["pretrain", "downstream", "all"], "Stages to run.")


def main(argv):
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter at INFO
    logging.getLogger("simclr_jax").setLevel(logging.INFO)
    from simclr_jax import xla_env

    xla_env.prefer_eigen_convolutions()  # XLA:CPU only; before jax starts (see xla_env)
    from simclr_jax import pipeline  # after flag parsing: jax starts here, not before
    from simclr_jax.errors import UserError

    config_path = flags.FLAGS["config"].config_filename
    workdir = _WORKDIR.value or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_path))[0]
    )
    try:
        summary = pipeline.run(_CONFIG.value, workdir, _MODE.value)
    except KeyboardInterrupt as err:
        print(f"\n{err or 'interrupted'} Rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"done: results in {summary['workdir']}")


if __name__ == "__main__":
    app.run(main)
