"""The errors that mean 'the input is wrong' (shown to the user as one clear line, exit code 2),
as opposed to bugs (a traceback)."""

from simclr_jax.checkpoint import CheckpointError
from simclr_jax.config import ConfigError
from simclr_jax.data import DataError
from simclr_jax.loop import Divergence
from simclr_jax.pipeline import WorkdirError

USER_ERRORS = (ConfigError, DataError, CheckpointError, WorkdirError, Divergence)
