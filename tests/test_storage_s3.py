"""A rebuild whose catalogue and run directory are `s3://` URIs, against a real S3 API (moto's
server) on loopback: the same graph as on local paths, manifests in the bucket, resume."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from autoknow_ray import storage
from autoknow_ray.catalogue.synth import synthesize
from autoknow_ray.cli import main
from autoknow_ray.pipeline import read_manifest, read_parquet_any, table_file
from autoknow_ray.schema import GRAPH_TABLES
from autoknow_ray.steps import Step
from tests.conftest import REPO, S3_ENDPOINT

# ingest -> graph -> report: every kind of read and write the pipeline does, without the models
# (whose fit alone would take this test's time; the model stages write through the same calls)
CONFIG = str(REPO / "configs" / "ingest-only.yaml")
BUCKET = "autoknow-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 API on the loopback port the session's environment names (tests/conftest.py), in a
    process of its own: the driver may block in a call the server has to answer."""
    import boto3

    host, port = S3_ENDPOINT.removeprefix("http://").split(":")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's S3 server did not start on {S3_ENDPOINT}")
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=S3_ENDPOINT)
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.terminate()
        server.wait(timeout=30)


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session, s3):
    """One catalogue (with rows to quarantine, in JSON Lines beside the Parquet shards), rebuilt
    on local paths and on the bucket with the stages that need no models."""
    import pyarrow.fs as pafs

    root = tmp_path_factory.mktemp("s3")
    cat = root / "catalogue"
    synthesize(200, cat, seed=0, n_types=8)
    first = pl.read_parquet(cat / "products" / "*.parquet").head(1)
    (cat / "products" / "extra.jsonl").write_text(
        first.write_ndjson() + '{"product_id": "x1", "title": "blue mug"}\n{"product_id": \n')
    remote = storage.path(f"s3://{BUCKET}/catalogue")
    pafs.copy_files(str(cat), remote.fs_path, destination_filesystem=remote.fs)
    for catalogue, out in ((cat, root / "run"), (remote, f"s3://{BUCKET}/run")):
        assert main(["rebuild", "--catalogue", str(catalogue), "--out", str(out),
                     "--config", CONFIG]) == 0
    return {"local": root / "run", "s3": storage.path(f"s3://{BUCKET}/run"), "catalogue": remote}


def _graph(run) -> dict[str, pl.DataFrame]:
    out = {}
    for name in GRAPH_TABLES:
        df = read_parquet_any(table_file(run / "graph", name))
        out[name] = df.sort(df.columns, nulls_last=True) if df.height else df
    return out


def test_graph_and_manifests_are_in_the_bucket(runs, s3):
    keys = _keys(s3, "run/")
    for stage in ("ingest", "graph", "report"):
        assert f"{stage}/manifest.json" in keys
    assert {"graph/taxonomy.parquet", "graph/attributes.parquet", "graph/synonyms.parquet",
            "report.json", "report.html"} <= keys
    assert any(k.startswith("graph/triples/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("graph/related/") and k.endswith(".parquet") for k in keys)
    assert not [k for k in keys if k.startswith(".")]  # no stage tmp or resume folder left
    ingest = read_manifest(runs["s3"] / "ingest")
    assert ingest["rows_in"] == ingest["rows_out"] + ingest["rows_quarantined"]
    for t in ingest["tables"].values():
        assert t["rows_in"] == t["rows_out"] + t["rows_quarantined"]
    products = ingest["tables"]["products"]
    assert (products["rows_in"], products["rows_out"], products["rows_quarantined"]) == (203, 201, 2)


def test_same_graph_as_on_local_paths(runs):
    local, remote = _graph(runs["local"]), _graph(runs["s3"])
    assert local["triples"].height > 200
    for name in GRAPH_TABLES:
        assert remote[name].equals(local[name]), name
    q_local = read_parquet_any(table_file(runs["local"] / "ingest", "quarantine"))
    q_remote = read_parquet_any(table_file(runs["s3"] / "ingest", "quarantine"))
    assert q_remote.sort(q_remote.columns).equals(q_local.sort(q_local.columns))
    assert "products/extra.jsonl" in q_remote["source"].to_list()
    for stage in ("ingest", "graph"):
        a, b = read_manifest(runs["local"] / stage), read_manifest(runs["s3"] / stage)
        assert a["rows_out"] == b["rows_out"], stage


def test_rerun_skips_finished_stages_and_discards_a_killed_ones_output(runs, s3, capsys):
    args = ["rebuild", "--catalogue", str(runs["catalogue"]), "--out", str(runs["s3"]),
            "--config", CONFIG]
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped (up to date)") == 2  # report always runs
    # the graph stage killed mid-way: its manifest never written, a partial tmp folder left
    before = _graph(runs["s3"])
    s3.delete_object(Bucket=BUCKET, Key="run/graph/manifest.json")
    s3.put_object(Bucket=BUCKET, Key="run/.graph.tmp/triples/partial.parquet", Body=b"not parquet")
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped (up to date)") == 1  # ingest
    keys = _keys(s3, "run/")
    assert "graph/manifest.json" in keys and not [k for k in keys if k.startswith(".graph.tmp")]
    after = _graph(runs["s3"])
    for name in GRAPH_TABLES:
        assert after[name].equals(before[name]), name


def test_chunked_step_resumes_on_the_bucket(ray_session, s3):
    """`map_step_checkpointed` with its input, output and chunk markers in the bucket: a step
    killed in its third chunk resumes after the first two, no row twice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from autoknow_ray import runtime
    from autoknow_ray.config import Config
    from autoknow_ray.steps import Step

    class Tag(Step):
        name = "tag"
        columns = ("product_id",)

        def __init__(self, fail_on: str | None = None):
            self.fail_on = fail_on

        def process_batch(self, batch):
            if self.fail_on in batch.column("product_id").to_pylist():
                raise RuntimeError("killed mid-stage")
            return batch.append_column("tag", pa.array(["x"] * batch.num_rows))

    root = storage.path(f"s3://{BUCKET}/chunks")
    for i in range(6):
        pq.write_table(pa.table({"product_id": [f"p{i}-{j}" for j in range(50)]}),
                       str(root / "in" / f"part-{i:05d}.parquet"))
    files = [str(f) for f in (root / "in").rglob("*.parquet")]
    out, resume = root / "out", root / "resume"
    with pytest.raises(Exception, match="killed mid-stage"):
        runtime.map_step_checkpointed(files, Tag("p5-7"), Config(), out, resume, chunk_rows=100)
    assert [p.name for p in resume.glob("*.done")] == ["chunk-00000.done", "chunk-00001.done"]
    stats = runtime.map_step_checkpointed(files, Tag(), Config(), out, resume, chunk_rows=100)
    assert (stats["chunks"], stats["skipped"], stats["rows"]) == (3, 2, 300)
    got = read_parquet_any(out)["product_id"].to_list()
    assert sorted(got) == sorted(f"p{i}-{j}" for i in range(6) for j in range(50))


def test_a_fit_into_the_bucket_is_refused_with_a_clear_error(runs, capsys):
    args = ["rebuild", "--catalogue", str(runs["catalogue"]), "--out", str(runs["s3"])]
    assert main([*args, "--models", f"s3://{BUCKET}/no-models"]) == 2
    assert "not a models folder" in capsys.readouterr().err
    # without --models, the fit would go into the bucket's RUN/models
    assert main([*args, "--config", str(REPO / "configs" / "test.yaml")]) == 2
    assert "must be a local path" in capsys.readouterr().err


class _ReadsArtifact(Step):
    """A model step in miniature: setup() reads a file of its local artifact folder."""

    name = "reads_artifact"
    model = True

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self, env):
        self.size = len((Path(self.folder) / "taxonomy" / "weights.bin").read_bytes())

    def process_batch(self, batch):
        return pa.table({"id": batch.column("id"), "size": pa.array([self.size] * batch.num_rows)})


def test_models_in_the_bucket_are_read_from_a_copy_on_each_node(runs, s3, tmp_path, monkeypatch):
    import ray

    from autoknow_ray import runtime
    from autoknow_ray.config import load_config

    monkeypatch.setenv("AUTOKNOW_CACHE_DIR", str(tmp_path / "cache"))
    models = storage.path(f"s3://{BUCKET}/models")
    (models / "manifest.json").write_text(json.dumps({"fingerprint": "m1"}))
    (models / "taxonomy" / "weights.bin").write_bytes(b"w" * 1000)
    local = runtime.use_models(models)
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "taxonomy" / "weights.bin").read_bytes() == b"w" * 1000
    assert runtime.use_models(models) == local  # made once: the same folder again
    # a worker makes the same copy on its node before setup(): gone here, it must copy again
    shutil.rmtree(local)
    runtime.use_models(models)
    shutil.rmtree(local)
    out = runtime.map_step(ray.data.from_items([{"id": i} for i in range(8)]),
                           _ReadsArtifact(str(local)), load_config(CONFIG), 8).take_all()
    assert sorted(r["size"] for r in out) == [1000] * 8
    assert (local / ".complete").exists()
    # the same through the command line: a rebuild with --models in the bucket
    args = ["rebuild", "--catalogue", str(runs["catalogue"]), "--out", f"s3://{BUCKET}/run-m",
            "--config", CONFIG, "--models", str(models)]
    assert main(args) == 0
    assert read_manifest(storage.path(f"s3://{BUCKET}/run-m/graph")).get("complete")
    assert runtime.use_models(None) is None  # a later local run copies nothing on its workers
    assert runtime._worker_env(runtime.plan_actors(load_config(CONFIG), "default", 8)).artifacts == ()


def test_shared_storage_check_probes_object_stores_too(s3):
    from autoknow_ray.runtime import check_shared_storage

    folder = storage.path(f"s3://{BUCKET}/probe")
    folder.mkdir(parents=True)
    seen = []

    def probe(node, sentinel, token):
        seen.append(storage.path(sentinel).read_text() == token)
        return node != "blind-node"

    check_shared_storage({"run": folder}, nodes=["node-a"], probe=probe)
    with pytest.raises(RuntimeError, match="credentials and endpoint"):
        check_shared_storage({"run": folder}, nodes=["node-a", "blind-node"], probe=probe)
    assert seen == [True, True, True]
    assert not [k for k in _keys(s3, "probe/") if k]  # the sentinels are gone
