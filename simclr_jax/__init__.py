"""simclr-jax: SimCLR (Chen et al., 2020) in JAX/Flax.

Data flows down the modules: data -> augment -> models -> losses -> (train_state, checkpoint, loop,
evaluate, classifier) -> pretrain | downstream -> report, orchestrated by pipeline.run (what run.py
calls). The README's Layout section lists every module and what it owns.
"""

__version__ = "0.1.0"
