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


def test_cpu_bf16_is_chosen_by_a_measurement_not_by_the_flags(monkeypatch):
    """`auto` bf16 on CPU: never without bf16 units; with them, only where the probe finds bf16
    faster than fp32 (the same flag ran MiniLM 3x faster on one CPU and 1.6x slower on another)."""
    import torch

    from autoknow_ray.nn import encoder

    cpu = torch.device("cpu")
    encoder.cpu_bf16_pays.cache_clear()
    try:
        monkeypatch.setattr(encoder, "cpu_has_bf16", lambda: False)
        assert encoder.cpu_bf16_pays() is False and encoder.inference_bf16("auto", cpu) is False
        encoder.cpu_bf16_pays.cache_clear()
        monkeypatch.setattr(encoder, "cpu_has_bf16", lambda: True)
        # a clock under which every fp32 round takes 1 tick and every bf16 round 3: slower
        ticks = {"fp32": 1, "bf16": 3}
        state = {"t": 0.0, "mode": "fp32"}
        real_autocast = encoder.autocast

        def autocast(device, bf16):
            state["mode"] = "bf16" if bf16 else "fp32"
            return real_autocast(device, bf16)

        def clock():  # half a round per reading
            state["t"] += ticks[state["mode"]] / 2
            return state["t"]

        monkeypatch.setattr(encoder, "autocast", autocast)
        monkeypatch.setattr(encoder, "_clock", clock)
        assert encoder.cpu_bf16_pays() is False
        encoder.cpu_bf16_pays.cache_clear()
        ticks.update(fp32=3, bf16=1)
        assert encoder.cpu_bf16_pays() is True and encoder.inference_bf16("auto", cpu) is True
        assert encoder.inference_bf16(False, cpu) is False and encoder.inference_bf16(True, cpu) is True
    finally:
        encoder.cpu_bf16_pays.cache_clear()
