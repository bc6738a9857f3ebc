"""The stated architecture is the checked one: import-linter's contract (.importlinter) passes, it
sees every module (models/ and launch/ included), ARCHITECTURE.md states the same layers and lists
every module, and the package installs models/ and launch/ under prunenet_jax only."""
import configparser
import os
import re
import subprocess
import sys

import pytest

from tests.machine import require_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
grimp = require_module("grimp")  # installed with import-linter (the test extras)


def contract_layers() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, ".importlinter"))
    raw = cfg["importlinter:contract:layers"]["layers"]
    return [" ".join(line.split()) for line in raw.strip().splitlines() if line.strip()]


def stated_layers() -> list[str]:
    text = open(os.path.join(ROOT, "ARCHITECTURE.md")).read()
    block = re.search(r"<!-- layers -->\n```\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md lost its layers block (<!-- layers --> then a fenced block)"
    return [" ".join(line.split()) for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("prunenet_jax")


def source_modules() -> set[str]:
    """Every module file under prunenet_jax/, through the links to models/ and launch/."""
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "prunenet_jax"), followlinks=True):
        if "__pycache__" in folder:
            continue
        rel = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for name in files:
            if name.endswith(".py"):
                found.add(rel if name == "__init__.py" else f"{rel}.{name[:-3]}")
    return found


def test_lint_imports_passes():
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_checker_sees_every_module_and_import(graph):
    assert set(graph.modules) == source_modules()
    assert "prunenet_jax.models.decoder" in graph.modules
    assert "prunenet_jax.launch.prune" in graph.modules
    # an import into models/ from the library is an edge of the graph
    assert "prunenet_jax.models.decoder" in graph.find_modules_directly_imported_by(
        "prunenet_jax.perplexity")


def test_the_contract_has_no_ignored_imports():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, ".importlinter"))
    for section in cfg.sections():
        assert "ignore_imports" not in cfg[section], section


def test_architecture_md_states_the_contract_layers():
    assert stated_layers() == contract_layers()


def test_every_top_level_part_is_in_a_layer(graph):
    layered = {part for layer in contract_layers() for part in layer.split(" | ")}
    top = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1}
    assert top == layered


def test_architecture_md_lists_every_module():
    text = open(os.path.join(ROOT, "ARCHITECTURE.md")).read()
    listed = set(re.findall(r"^\| `([\w/]+)\.py` \|", text, re.M))
    want = {m.split(".", 1)[1].replace(".", "/") for m in source_modules()
            if m != "prunenet_jax" and not os.path.isdir(os.path.join(ROOT, *m.split(".")))}
    assert want - listed == set(), "ARCHITECTURE.md does not list these modules"
    assert listed - want == set(), "ARCHITECTURE.md lists modules that do not exist"


def test_install_puts_models_and_launch_under_the_package_only():
    from setuptools import find_packages

    for link, target in (("models", "../models"), ("launch", "../launch")):
        assert os.readlink(os.path.join(ROOT, "prunenet_jax", link)) == target
    packages = set(find_packages(ROOT, include=["prunenet_jax", "prunenet_jax.*"]))
    assert {"prunenet_jax.models", "prunenet_jax.launch", "prunenet_jax.files"} <= packages
    assert not {p for p in packages if not p.startswith("prunenet_jax")}
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    assert 'find_packages(include=["prunenet_jax", "prunenet_jax.*"])' in setup_py
    assert "package_dir" not in setup_py
