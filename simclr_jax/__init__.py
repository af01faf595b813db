"""simclr-jax: SimCLR (Chen et al., 2020) in JAX/Flax.

Data flows down the modules: data -> augment -> models -> losses -> (train_state, checkpoint, loop,
evaluate, classifier) -> pretrain | downstream -> report, orchestrated by pipeline.run (what run.py
calls). The README's Layout section lists every module and what it owns.

`load_encoder(path)` (simclr_jax.encoder) is the entry point for using a trained encoder; it is
imported on first use, so `import simclr_jax` stays light (no jax).
"""

__version__ = "0.1.0"
__all__ = ["Encoder", "load_encoder"]


def __getattr__(name: str):
    if name in __all__:
        from simclr_jax import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module 'simclr_jax' has no attribute {name!r}")
