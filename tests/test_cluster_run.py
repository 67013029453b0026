"""The job runs where its users run it: a `ray start` cluster, `ray job submit`, faults survived.

Every cluster here lives in subprocesses, bound to 127.0.0.1, with its own temp dir, ports and
auth token: `ray start --head` for the documented single-machine path, and `ray.cluster_utils`
in a holder process for the multi-node one (a `ray start` worker node cannot join a head bound to
loopback). Clusters are stopped by killing their own process trees by PID. `ray stop` is never
called: it kills every Ray process on the machine, the test session's `ray_session` and other
developers' clusters included. This process never calls `ray.init`.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoknow_ray.pipeline import read_parquet_any, table_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
STAGES_CONFIG = "stages: [ingest, graph, report]\nseed: 0\n"
TYPES = [("green tea", "tea"), ("black tea", "tea"), ("tea", "beverages"), ("coffee", "beverages"),
         ("beverages", None), ("snacks", None), ("chips", "snacks")]
BRANDS = ["Acme", "Bolt", "Cora", "Dune"]
FLAVORS = ["Mint", "Lemon", "Plain", "Smoky", "Salted"]


# ---- a tiny catalogue in the DESIGN.md format ---------------------------------------------------

def product(i: int) -> dict:
    t = TYPES[i % len(TYPES)][0]
    brand, flavor = BRANDS[i % len(BRANDS)], FLAVORS[i % len(FLAVORS)]
    return {
        "product_id": f"p{i:06d}",
        "title": f"{brand} {flavor} {t.title()} {i % 50 + 1} Count",
        "description": f"A {flavor.lower()} {t} from {brand}. Item {i}.",
        "bullets": [f"{flavor} taste", f"pack of {i % 50 + 1}"],
        "product_type": t if i % 9 else None,
        "attributes": [{"name": "Flavor", "value": flavor}, {"name": "Count", "value": str(i % 50 + 1)}],
        "brand": brand,
    }


def write_catalogue(d: Path, n: int, shards: int = 1) -> Path:
    """products as JSON Lines (one file, or a folder of shards) with two bad rows; taxonomy.parquet."""
    d.mkdir(parents=True)
    rows = [json.dumps(product(i)) for i in range(n)]
    rows.insert(n // 2, json.dumps({"product_id": "p000001", "title": "the same id again"}))
    rows.append(json.dumps({"product_id": "no-title"}))
    if shards == 1:
        (d / "products.jsonl").write_text("\n".join(rows) + "\n")
    else:
        (d / "products").mkdir()
        step = -(-len(rows) // shards)
        for s in range(shards):
            shard = rows[s * step:(s + 1) * step]
            (d / "products" / f"part-{s:04d}.jsonl").write_text("\n".join(shard) + "\n")
    pq.write_table(pa.table({"type": [t for t, _ in TYPES], "parent": [p for _, p in TYPES]}),
                   d / "taxonomy.parquet")
    return d


def graph_digest(run: Path) -> tuple[int, str]:
    """Row count and content hash of graph/triples (a file or a folder of shards),
    order-independent."""
    t = read_parquet_any(table_file(run / "graph", "triples")).to_arrow()
    rows = sorted(zip(*(t.column(c).to_pylist() for c in t.column_names)),
                  key=lambda r: tuple("" if v is None else str(v) for v in r))
    h = hashlib.sha256(json.dumps([t.column_names, rows], default=str).encode()).hexdigest()
    return t.num_rows, h


def table_digest(path: Path) -> str:
    t = read_parquet_any(path).to_arrow()
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def ingest_counts(run: Path) -> dict:
    m = json.loads((run / "ingest" / "manifest.json").read_text())
    return {k: m[k] for k in ("rows_in", "rows_out", "rows_quarantined", "tables")}


# ---- local clusters, started and stopped by this test only ------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Holds a multi-node cluster (ray.cluster_utils) in its own process until its stdin closes; prints
# the address and each worker node's raylet pid, so the test can kill a node without `ray.init`.
MULTINODE_HOLDER = """
import json, sys
from ray.cluster_utils import Cluster
temp_dir, workers, agent_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=0, temp_dir=temp_dir, include_dashboard=False, object_store_memory=150 << 20,
    dashboard_agent_listen_port=agent_port))
nodes = [cluster.add_node(num_cpus=1, temp_dir=temp_dir, object_store_memory=100 << 20)
         for _ in range(workers)]
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address,
                  "raylets": [n.all_processes["raylet"][0].process.pid for n in nodes]}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""


class LocalCluster:
    """A Ray cluster on 127.0.0.1 in subprocesses, isolated by temp dir, ports and auth token."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="akr-", dir="/tmp"))  # short: socket paths ≤ 107 chars
        self.temp_dir = self.root / "ray"
        self.port = free_port()
        self.dashboard_port = free_port()
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH", "RAY_JOB"))}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the venv, "activated"
            VIRTUAL_ENV=str(VENV_BIN.parent),
            RAY_AUTH_MODE="token",  # explicit: never fall back to ~/.ray/auth_token
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_USAGE_STATS_ENABLED="0",
            # Ray's default temp dir holds `ray_current_cluster`, which a bare `ray.init()` anywhere
            # on this machine would join: keep it inside this cluster's own folder
            RAY_TMPDIR=str(self.root),
            # Ray rewrites 127.0.0.1 (in --node-ip-address, --address, ray.init) to the machine's
            # address; told that this host is no real cluster, every node, driver and port stays on
            # 127.0.0.1. The processes inherit it, so the job's driver connects the same way.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            # a killed node is declared dead in ~2 s instead of ~30 s
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
            HF_HUB_OFFLINE="1",
            AUTOKNOW_PROGRESS="0",
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.holder: subprocess.Popen | None = None
        self.raylets: list[int] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ray(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def start_head(self, num_cpus: int) -> None:
        """The documented local path: `ray start --head` with the dashboard on loopback."""
        r = self.ray("start", "--head", f"--port={self.port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                     f"--temp-dir={self.temp_dir}", "--object-store-memory=150000000",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={free_port()}",
                     f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats")
        assert r.returncode == 0, f"ray start --head failed:\n{r.stdout}\n{r.stderr}"

    def start_multinode(self, workers: int) -> None:
        """A head without CPUs, so every task runs on one of `workers` 1-CPU worker nodes."""
        self.holder = subprocess.Popen(
            [sys.executable, "-c", MULTINODE_HOLDER, str(self.temp_dir), str(workers), str(free_port())],
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.root / "holder.log", "w"), text=True)
        line = self.holder.stdout.readline()
        assert line, f"the cluster did not start: {(self.root / 'holder.log').read_text()[-3000:]}"
        info = json.loads(line)
        self.port = int(info["address"].rsplit(":", 1)[1])
        assert info["address"] == self.address, info
        self.raylets = info["raylets"]

    def processes(self) -> set[int]:
        """Every process of this cluster: those naming its temp dir, and all their descendants."""
        procs = process_table()
        marker = str(self.root)
        roots = {pid for pid, (_, _, cmd) in procs.items() if marker in cmd}
        if self.holder is not None and self.holder.poll() is None:
            roots.add(self.holder.pid)
        return descendants(procs, roots) - {os.getpid()}

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.stdin.close()  # the holder shuts its cluster down
            try:
                self.holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        pids = self.processes()  # whatever is left, by pid, never by name
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                if self.holder is not None:
                    self.holder.poll()  # reap our own child
                pids = {p for p in pids if alive(p)}
                time.sleep(0.1)
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, name, command line), from /proc (no psutil in the project's dependencies)."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        table[int(d.name)] = (ppid, name, cmd)
    return table


def descendants(procs: dict[int, tuple[int, str, str]], roots: set[int]) -> set[int]:
    out, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in procs.items() if ppid in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def autoknow_rebuild(cluster: LocalCluster, catalogue: Path, run: Path, config: Path) -> list[str]:
    return [str(VENV_BIN / "autoknow"), "rebuild", "--catalogue", str(catalogue), "--out", str(run),
            "--config", str(config), "--address", cluster.address]


# ---- a: the documented local path, `ray start` + `ray job submit` -----------------------------

def test_ray_job_submit_runs_the_rebuild_on_a_started_cluster(tmp_path):
    catalogue = write_catalogue(tmp_path / "catalogue", n=20)
    run = tmp_path / "run"
    config = tmp_path / "stages.yaml"
    # num_cpus only sizes an embedded cluster: seeing 2 CPUs in the report proves the driver
    # attached to the job's cluster (through RAY_ADDRESS, set by the job server) instead
    config.write_text(STAGES_CONFIG + "ray:\n  num_cpus: 1\n")
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=2)
        r = cluster.ray(
            "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard_port}",
            "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml",
            "--", "python", "jobs/rebuild.py", "--catalogue", str(catalogue), "--out", str(run),
            "--config", str(config),
            cwd=REPO, timeout=240)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    finally:
        cluster.stop()
    assert "graph:" in out and "ingest" in out  # the CLI's summary, streamed back by the job server
    n, _ = graph_digest(run)
    assert n > 20
    report = json.loads((run / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]][:2] == ["ingest", "graph"]
    ingest = report["stages"][0]
    assert (ingest["rows_in"], ingest["rows_quarantined"]) == (22 + len(TYPES), 2) and ingest["balanced"]
    assert report["cluster"]["cpus"] == 2.0 and report["cluster"]["nodes"] == 1
    assert pq.read_table(run / "graph" / "taxonomy.parquet").num_rows == len(TYPES)


# ---- b: faults on a local multi-node cluster --------------------------------------------------

@pytest.fixture(scope="module")
def multinode():
    cluster = LocalCluster()
    try:
        cluster.start_multinode(workers=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def fault_catalogue(tmp_path_factory):
    # 48 shards: ~48 read->validate->write tasks, enough for a node to die with some in flight
    return write_catalogue(tmp_path_factory.mktemp("faults") / "catalogue", n=24_000, shards=48)


@pytest.fixture(scope="module")
def undisturbed(multinode, fault_catalogue, tmp_path_factory):
    run = tmp_path_factory.mktemp("undisturbed") / "run"
    config = REPO / "configs" / "ingest-only.yaml"  # the shipped one: ingest, graph, report
    r = subprocess.run(autoknow_rebuild(multinode, fault_catalogue, run, config), env=multinode.env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"run": run, "config": config, "graph": graph_digest(run), "ingest": ingest_counts(run),
            "quarantine": table_digest(table_file(run, "quarantine")),
            "taxonomy": table_digest(run / "graph" / "taxonomy.parquet")}


def assert_same_run(run: Path, undisturbed: dict) -> None:
    assert ingest_counts(run) == undisturbed["ingest"], "ingest counts differ: rows duplicated or lost"
    assert table_digest(table_file(run, "quarantine")) == undisturbed["quarantine"]
    assert graph_digest(run) == undisturbed["graph"], "graph/triples differs"
    assert table_digest(run / "graph" / "taxonomy.parquet") == undisturbed["taxonomy"]


def test_a_worker_node_killed_mid_ingest_changes_nothing(multinode, fault_catalogue, undisturbed, tmp_path):
    run, log = tmp_path / "run", tmp_path / "driver.log"
    with open(log, "w") as f:
        driver = subprocess.Popen(autoknow_rebuild(multinode, fault_catalogue, run, undisturbed["config"]),
                                  env=multinode.env, stdout=f, stderr=subprocess.STDOUT)
    staged = run / ".ingest.tmp" / "_staging" / "products-validated"
    victim = multinode.raylets[-1]
    try:
        deadline = time.monotonic() + 120
        # mid-stage: the first validated shards are on disk, the stage is not done
        while not (staged.is_dir() and any(staged.glob("*.parquet"))):
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "ingest never started writing"
            time.sleep(0.02)
        written_before_kill = len(list(staged.glob("*.parquet")))
        os.kill(victim, signal.SIGKILL)  # the node's raylet: it dies with its workers, tasks and objects
        assert not (run / "ingest" / "manifest.json").exists(), "the kill came after ingest ended"
        driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    out = log.read_text()
    assert driver.returncode == 0, out[-4000:]
    assert written_before_kill < 48
    # the cluster saw the node die while the stage ran (the driver streams Ray's own notice: a
    # task lost with its node and retried, or the node marked dead). Which notice the driver gets
    # depends on timing: on a fast machine the retries may finish before the death is reported
    # per task, so any of them is proof that the kill landed during the run.
    notices = ("node it was running on is dead", "will be retried", "has been marked dead",
               "Raylet is terminated")
    assert any(n in out for n in notices), out[-4000:]
    assert_same_run(run, undisturbed)


def test_a_killed_driver_resumes_after_ingest(multinode, fault_catalogue, undisturbed, tmp_path):
    run = tmp_path / "run"
    cmd = autoknow_rebuild(multinode, fault_catalogue, run, undisturbed["config"])
    driver = subprocess.Popen(cmd, env=multinode.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (run / "ingest" / "manifest.json").exists():
            assert driver.poll() is None, "the driver ended before ingest finished"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        driver.send_signal(signal.SIGKILL)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL
    assert not (run / "report.json").exists(), "the driver finished before it was killed"
    r = subprocess.run(cmd, env=multinode.env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("  ")}
    assert "skipped (up to date)" in lines["ingest"], r.stdout
    assert "skipped" not in lines["graph"], r.stdout
    assert not list(run.glob(".*.tmp")), "a stage's tmp folder was left behind"
    assert_same_run(run, undisturbed)
