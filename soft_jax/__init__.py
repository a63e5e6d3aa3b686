"""soft_jax: Soft Thinking and Stochastic Soft Thinking decoders on the codi_jax core."""
