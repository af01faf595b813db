"""simclr-jax: SimCLR (Chen et al., 2020) in JAX/Flax.

The package is in folders by role, imports running one way: app -> stages -> report, evaluation
-> train -> core -> data -> runtime -> errors (docs/architecture.md lists every module and what
it owns; app.main.run is what run.py calls).

`load_encoder(path)` (simclr_jax.pretrained) is the entry point for using a trained encoder; it is
imported on first use, so `import simclr_jax` stays light (no jax).
"""

__version__ = "0.1.0"
__all__ = ["Encoder", "load_encoder"]


def __getattr__(name: str):
    if name in __all__:
        from simclr_jax import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'simclr_jax' has no attribute {name!r}")
