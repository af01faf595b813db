"""The command line (what run.py runs): absl flags and the ml_collections config, bad input as one
`error:` line with exit code 2, then app.main.run with signals and the console set up.

Config values are overridden with --config.section.key=value (unknown keys are refused). Nothing
here imports jax at import time: it starts in `main`, after the flags are parsed.
"""

import difflib
import logging
import os
import signal
import sys

from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = "configs/digits_simclr.py"
# No default here: ml_collections would load it, and apply the overrides, while this module is
# imported, where a misspelt key is a traceback; parse_flags adds it to the command line instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    f"Path to a config file with get_config() (default {DEFAULT_CONFIG}).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_MODE = flags.DEFINE_enum(
    "mode",
    "all",
    ["pretrain", "downstream", "distill", "all"],
    "Stages to run (all = pretrain + downstream; distill needs a downstream run in --workdir).",
)


class Terminated(KeyboardInterrupt):
    """SIGTERM before app.main.run records signals (runtime/signals.py), before any work: stop as Ctrl-C."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated("terminated (SIGTERM).")


def _config_keys(node, prefix="") -> list[str]:
    out = []
    for key, value in node.items():
        if hasattr(value, "items"):
            out += _config_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.lstrip("-").startswith("config="):
            return arg.split("=", 1)[1]
        if arg.lstrip("-") == "config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def _unknown_config_key(argv: list[str]) -> str | None:
    """The message for the first --config.KEY override of argv that is not a key of the config
    file (ml_collections fails on it with a traceback), or None when every key exists."""
    path = _config_path(argv)
    plain = flags.FlagValues()  # the config file alone, loaded without argv's overrides
    holder = config_flags.DEFINE_config_file("config", None, flag_values=plain, sys_argv=[])
    try:
        plain(["run.py", "--config", path])
        keys = _config_keys(holder.value)
    except Exception:  # the file itself does not load: not a key problem
        return None
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        name = name[2:] if name.startswith("noconfig.") else name
        key = name[len("config.") :]
        if not name.startswith("config.") or key in keys or key in sections:
            continue
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"did you mean config.{close[0]}?" if close else f"the keys are those of {path}"
        return f"config.{key} is not a config key; {hint}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with bad command-line input shown as one `error:` line and exit code 2
    (a misspelt config key is a traceback from ml_collections otherwise, a bad value exit code 1)."""
    if not any(
        a in ("-config", "--config") or a.startswith(("-config=", "--config=")) for a in argv
    ):
        argv = [argv[0], "--config", DEFAULT_CONFIG, *argv[1:]]
    try:
        args = flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError) as err:
        message = _unknown_config_key(argv)
        if message is None and not isinstance(err, flags.Error):
            raise  # not a key we can name: keep the traceback
        print(f"error: {message or err}", file=sys.stderr)
        sys.exit(2)
    try:
        _ = flags.FLAGS["config"].value  # the file loads lazily: fail here, not in main
    except OSError as err:  # no such file, unreadable: the last line of the cause says which
        cause = str(err.__cause__ or err).strip().splitlines()[-1].strip()
        print(f"error: --config {flags.FLAGS['config'].config_filename}: {cause}", file=sys.stderr)
        sys.exit(2)
    return args


def main(argv):
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter at INFO
    logging.getLogger("simclr_jax").setLevel(logging.INFO)
    signal.signal(
        signal.SIGTERM, _raise_terminated
    )  # until app.main.run records it (runtime/signals.py)
    from simclr_jax.runtime import xla

    # XLA:CPU only; before jax starts. On jaxlib >= 0.12 these are oneDNN's, whose programs jax
    # cannot write to its cache: its "Error writing persistent compilation cache entry" warnings
    # are left on, as they say what happens (xla_env's docstring; SIMCLR_JAX_CPU_CONVS=default).
    xla.cpu_convolutions()
    xla.use_compilation_cache()  # a rerun loads its compiled programs (~/.cache/simclr-jax)
    from simclr_jax.app import main as pipeline
    from simclr_jax.errors import UserError
    from simclr_jax.runtime import console  # after flag parsing: jax starts here, not before

    config_path = flags.FLAGS["config"].config_filename
    workdir = _WORKDIR.value or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_path))[0]
    )
    try:
        with console.logs_above_progress_bars():
            summary = pipeline.run(_CONFIG.value, workdir, _MODE.value)
    except KeyboardInterrupt as err:  # Ctrl-C (130) or SIGTERM (143), as a shell reports them
        print(f"\n{err or 'interrupted.'} Rerun the same command to resume.", file=sys.stderr)
        sys.exit(128 + getattr(err, "signum", signal.SIGINT))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    import jax

    if jax.process_index() == 0:  # the others only warn
        print("\n".join(console.summary_lines(summary)))
