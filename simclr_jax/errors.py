"""The errors that mean 'the input is wrong', as opposed to bugs.

Every module raises these (this one imports nothing, so anything may import it); run.py shows a
`UserError` as one clear line and exits with code 2, while any other exception is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and what to set instead."""


class DataError(UserError, RuntimeError):
    """The dataset cannot be read; the message says how to prepare or point at it."""


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one is required, or one that does not fit the config."""


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be used as asked; the message says why and what to do."""


class InputError(UserError, ValueError):
    """Arrays passed to the public API (`load_encoder`'s encoder) that it cannot read: the message
    says which shape or values it needs."""


class Divergence(UserError, FloatingPointError):
    """The loss became NaN or Inf; the message names the first bad step."""
