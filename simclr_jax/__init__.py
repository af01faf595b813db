"""simclr-jax: SimCLR (Chen et al., 2020) in JAX/Flax.

Data flows down the modules: data -> augment -> models -> losses -> pretrain -> downstream -> report,
orchestrated by pipeline.run (what run.py calls).
"""

__version__ = "0.1.0"
