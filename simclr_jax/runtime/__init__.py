"""How a run executes, below the method: devices and the pmap axis (parallel), signals and stop
points (signals), metrics.jsonl and TensorBoard (records), the console, XLA's CPU settings and
compilation cache (xla, cpu_conv). Imports no training code."""
