"""prunenet-jax: calibration-free LLM FFN pruning with a learned policy (PruneNet) in JAX/Flax."""
import os as _os

# The repository keeps models/ and launch/ beside this package (the user's layout); setup.py
# installs them as prunenet_jax.models and prunenet_jax.launch so no generic top-level name lands
# in site-packages. In a source checkout, let the same import names resolve to those folders.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isdir(_os.path.join(_root, "models")):
    __path__.append(_root)
