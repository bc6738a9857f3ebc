"""prunenet-jax. The repository's models/ and launch/ are reached through the links
prunenet_jax/models and prunenet_jax/launch, so they install as prunenet_jax.models and
prunenet_jax.launch and no generic top-level `models` or `launch` lands in site-packages."""
import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def _requirements(name):
    lines = (here / name).read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setup(
    name="prunenet-jax",
    version="0.1.0",
    description="Calibration-free FFN pruning of LLaMA-family models with a learned policy (PruneNet), in JAX/Flax",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["prunenet_jax", "prunenet_jax.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt"),
                    "lm_eval": ["lm-eval==0.4.13", "accelerate>=1.0"]},
    entry_points={"console_scripts": [
        "prunenet-batch-prune=prunenet_jax.launch.batch_prune:run",
        "prunenet-convert=prunenet_jax.launch.convert:run",
        "prunenet-evaluate=prunenet_jax.launch.evaluate:run",
        "prunenet-generate=prunenet_jax.launch.generate:run",
        "prunenet-prune=prunenet_jax.launch.prune:run",
        "prunenet-recover=prunenet_jax.launch.recover:run",
    ]},
)
