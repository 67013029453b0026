"""One Ray instance for the whole test session (starting Ray costs seconds and ~0.5 GB)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AUTOKNOW_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The object-store tests (test_storage_s3.py) serve an S3 API on this loopback port. pyarrow, in
# the driver and in every Ray worker, takes its endpoint and credentials from these variables, so
# they are set before the session's Ray starts (its workers inherit them); the fake credentials
# also keep any test from reaching a real account.
# A Ray worker that imports a test module imports this file too: it keeps the session's port
# (inherited through the environment) instead of picking another.
S3_ENDPOINT = os.environ.get("AUTOKNOW_TEST_S3_ENDPOINT") or f"http://127.0.0.1:{_free_port()}"
os.environ.update({"AUTOKNOW_TEST_S3_ENDPOINT": S3_ENDPOINT, "AWS_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"})

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOKNOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not present: {p}")
    return p


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
    from autoknow_ray.runtime import configure_data_context

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    configure_data_context(ctx)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def taxonomy_models(tmp_path_factory, ray_session) -> Path:
    """Module 1's models fitted once a session with `configs/test.yaml` on a generated catalogue
    (400 products, seed 0, 12 types): ROOT/train is the catalogue, ROOT/models the models.
    test_rebuild.py rebuilds a held-out copy of its products with them, test_incremental.py a
    catalogue of its first 300 products and changed copies of it. Each file fitted the same
    config on a catalogue of its own before (one fit fewer now, ~16 s). Tests only read
    ROOT/train and ROOT/models; a test that adds a module to the models copies them first."""
    from autoknow_ray.catalogue.synth import synthesize
    from autoknow_ray.cli import main

    root = tmp_path_factory.mktemp("taxonomy_models")
    synthesize(400, root / "train", seed=0, n_types=12)
    assert main(["fit", "--catalogue", str(root / "train"), "--out", str(root / "models"),
                 "--config", str(REPO / "configs" / "test.yaml")]) == 0
    return root


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
