"""SimCLR in JAX: `python run.py --config configs/cifar_simclr.py [--workdir DIR] [--mode=...]`.

Config values are overridden with --config.section.key=value (unknown keys are refused); the
flags and what they run: simclr_jax/app/cli.py.
"""

from absl import app

from simclr_jax.app import cli

if __name__ == "__main__":
    app.run(cli.main, flags_parser=cli.parse_flags)
