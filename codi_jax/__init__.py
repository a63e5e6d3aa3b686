"""codi_jax: CODI (continuous chain-of-thought via self-distillation) on a functional JAX/Flax core."""

__version__ = "0.1.0"
