"""Models load from local safetensors only: pickles are refused, hub ids never reach the network."""
from __future__ import annotations

import socket

import pytest

from autoknow_ray.nn.encoder import check_safetensors, load_encoder, resolve_encoder


def test_a_folder_with_only_a_pickled_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_encoder(str(tmp_path))


def test_the_packaged_encoder_is_safetensors():
    check_safetensors(resolve_encoder("default"))  # raises if it were not


def test_a_hub_id_never_reaches_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    # the flags were read at import time: set them as a user's online environment would have
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    tried = []

    def no_connect(self, address, *a, **k):
        tried.append(address)
        raise OSError("network disabled by the test")

    def no_lookup(host, *a, **k):
        tried.append(host)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    with pytest.raises(OSError):
        load_encoder("autoknow-test/not-a-cached-model")
    assert tried == [], f"a connection was attempted: {tried}"
