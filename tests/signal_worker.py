"""run.py with a signal sent to itself at an exact point of a run (tests/test_stops.py).

    python tests/signal_worker.py PHASE@WHEN SIGNAL [again] -- RUN.PY FLAGS...

PHASE is a step loop's phase ('pretrain', 'finetune', ...). WHEN is a step number N (the signal
arrives while step N runs: after its inputs are fetched, before the step is dispatched) or 'eval'
(while the phase's first epoch-end evaluation runs). With 'again', a second signal of the same
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
    phase, when = point.split("@")
    signum = getattr(signal, signame)
    sys.argv = [os.path.join(REPO, "run.py"), *sys.argv[split + 1 :]]
    sent = []

    def send():
        sent.append(signum)
        os.kill(os.getpid(), signum)

    from simclr_jax import xla_env

    xla_env.cpu_convolutions()  # as run.py does, before jax starts
    xla_env.use_compilation_cache()
    from simclr_jax import loop

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

    import run as run_py

    run_py.app.run(run_py.main, flags_parser=run_py.parse_flags)


if __name__ == "__main__":
    main()
