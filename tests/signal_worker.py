"""run.py with a signal sent to itself at an exact point of a run (tests/test_stops.py).

    python tests/signal_worker.py PHASE@WHEN SIGNAL [again] -- RUN.PY FLAGS...
    python tests/signal_worker.py call:MODULE.FUNCTION:N SIGNAL -- RUN.PY FLAGS...

PHASE is a step loop's phase ('pretrain', 'finetune', ...). WHEN is a step number N (the signal
arrives while step N runs: after its inputs are fetched, before the step is dispatched) or 'eval'
(while the phase's first epoch-end evaluation runs). call:MODULE.FUNCTION:N sends it as the Nth
call of simclr_jax.MODULE.FUNCTION begins (work outside the step loops: evaluations, the report);
float-in:MODULE.FUNCTION inside the first float() of a jax array once that function has begun (where
numpy's setitem used to turn a raising handler's exception into a ValueError, issue #25). With 'again', a second signal of the same
kind arrives inside each later wait for a checkpoint to commit. A race-free way to hit the
moments a test names; everything else is run.py unchanged.
"""

import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    split = sys.argv.index("--")
    point, signame, *rest = sys.argv[1:split]
    signum = getattr(signal, signame)
    sys.argv = [os.path.join(REPO, "run.py"), *sys.argv[split + 1 :]]
    sent = []

    def send():
        sent.append(signum)
        os.kill(os.getpid(), signum)

    from simclr_jax.runtime import xla

    xla.cpu_convolutions()  # as run.py does, before jax starts
    xla.use_compilation_cache()
    if point.startswith("call:"):
        _on_call(point, send)
    elif point.startswith("float-in:"):
        _in_float(point, send, sent)
    else:
        _in_loop(point, send, sent, signum, rest)
    from absl import app

    from simclr_jax.app import cli

    app.run(cli.main, flags_parser=cli.parse_flags)


def _on_call(point, send):
    import importlib

    _, name, nth = point.split(":")
    module_name, function = name.rsplit(".", 1)
    module = importlib.import_module(f"simclr_jax.{module_name}")
    original, calls = getattr(module, function), [0]

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth):
            send()
        return original(*args, **kwargs)

    setattr(module, function, hooked)


def _in_float(point, send, sent):
    from jax._src import array

    begun = []
    _on_call(f"call:{point.split(':')[1]}:1", lambda: begun.append(1))
    to_float = array.ArrayImpl.__float__

    def hooked(self):
        if begun and not sent:
            send()  # delivered to the handler inside this conversion
        return to_float(self)

    array.ArrayImpl.__float__ = hooked


def _in_loop(point, send, sent, signum, rest):
    from simclr_jax.train import loop

    phase, when = point.split("@")
    run = loop.run

    def patched(spec, step_fn, state, inputs, start_step, writer, *args, **kwargs):
        if spec.phase != phase:
            return run(spec, step_fn, state, inputs, start_step, writer, *args, **kwargs)
        step = [start_step]

        def step_hook(state, *xs):
            step[0] += 1
            if when != "eval" and step[0] == int(when) and not sent:
                send()
            return step_fn(state, *xs)

        args = list(args)
        if when == "eval" and len(args) >= 2 and args[1] is not None:
            evaluate = args[1]

            def eval_hook(epoch, state):
                if not sent:
                    send()
                return evaluate(epoch, state)

            args[1] = eval_hook
        return run(spec, step_hook, state, inputs, start_step, writer, *args, **kwargs)

    loop.run = patched
    if "again" in rest:
        import orbax.checkpoint as ocp

        wait = ocp.CheckpointManager.wait_until_finished

        def wait_hook(self):
            if sent:
                os.kill(os.getpid(), signum)
            return wait(self)

        ocp.CheckpointManager.wait_until_finished = wait_hook


if __name__ == "__main__":
    main()
