"""prunenet-jax: calibration-free LLM FFN pruning with a learned policy (PruneNet) in JAX/Flax.

The repository keeps models/ and launch/ as top-level folders (the user's layout); the links
prunenet_jax/models -> ../models and prunenet_jax/launch -> ../launch make them subpackages, so
the same import names work in a checkout and when installed, and import-linter sees every module.
"""
