"""The shipped cluster configs parse and match what their consumers accept; nothing in them is unsafe.

- cluster/ray-cluster.yaml against Ray's own launcher schema (ray-schema.json, shipped with ray)
  and Ray's `prepare_config` + `validate_config`, as `ray up` runs them.
- cluster/kuberay/*.yaml against a structural check written from KubeRay's v1 CRDs
  (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml) and the operator's validation rules: the fields
  the operator needs, their types, and the rules it rejects a manifest for.
- jobs/*.py forward to the CLI; jobs/runtime_env.yaml is a valid runtime_env.
- No shipped config binds a server to 0.0.0.0 or carries a secret; no artifact is unpickled.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SHIPPED_DIRS = ("cluster", "jobs", "configs")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def shipped_files() -> list[Path]:
    files = []
    for d in SHIPPED_DIRS:
        files += [p for p in sorted((REPO / d).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return files


# ---- jobs/ -------------------------------------------------------------------------------------

@pytest.mark.parametrize("job", ["rebuild", "fit", "bench"])
def test_job_entrypoint_forwards_argv_to_the_cli(job, monkeypatch):
    import autoknow_ray.cli

    seen = []
    monkeypatch.setattr(autoknow_ray.cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--catalogue", "CAT", "--out", "RUN"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "jobs" / f"{job}.py"), run_name="__main__")
    assert exit_.value.code == 0
    assert seen == [[job, "--catalogue", "CAT", "--out", "RUN"]]


def test_job_entrypoints_take_the_cli_options():
    from autoknow_ray.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(["rebuild", "--catalogue", "C", "--out", "R", "--models", "M",
                           "--config", "configs/ingest-only.yaml", "--address", "auto", "--force"])
    assert (a.catalogue, a.out, a.models, a.address, a.force) == ("C", "R", "M", "auto", True)
    a = parser.parse_args(["fit", "--catalogue", "C", "--out", "M", "--modules", "taxonomy"])
    assert a.modules == ["taxonomy"]


def test_ingest_only_config_loads():
    from autoknow_ray.config import load_config

    assert load_config(REPO / "configs" / "ingest-only.yaml").stages == ["ingest", "graph", "report"]


def test_every_shipped_config_loads_and_pool_sizes_are_checked(tmp_path):
    import pydantic

    from autoknow_ray.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources:\n  taxonomy:\n    rows_per_call: 0\n")
    with pytest.raises((ValueError, pydantic.ValidationError), match="rows_per_call"):
        load_config(bad)


RUNTIME_ENV_FIELDS = {"working_dir", "py_modules", "excludes", "pip", "uv", "conda", "env_vars",
                      "container", "image_uri", "config", "nsight", "java_jars", "worker_process_setup_hook"}


def check_runtime_env(env: dict) -> None:
    assert isinstance(env, dict) and set(env) <= RUNTIME_ENV_FIELDS, set(env) - RUNTIME_ENV_FIELDS
    ev = env.get("env_vars", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in ev.items()), \
        "runtime_env env_vars must be strings (quote numbers and booleans)"
    assert ev.get("HF_HUB_OFFLINE") == "1"
    assert ev.get("TOKENIZERS_PARALLELISM") == "false"


def test_runtime_env_is_valid_for_ray(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    env = load_yaml(REPO / "jobs" / "runtime_env.yaml")
    check_runtime_env(env)
    monkeypatch.chdir(REPO)  # `ray job submit` resolves working_dir from where it runs
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert {".git", ".venv"} <= set(env.get("excludes", []))


# ---- cluster/ray-cluster.yaml: Ray's own launcher schema --------------------------------------

def ray_launcher_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_launcher_config_validates_against_rays_schema():
    import jsonschema

    cfg = load_yaml(CLUSTER / "ray-cluster.yaml")
    jsonschema.validate(cfg, ray_launcher_schema())


def test_launcher_config_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(load_yaml(CLUSTER / "ray-cluster.yaml")))
    validate_config(cfg)  # what `ray up` runs after filling the provider's defaults


def test_launcher_schema_check_is_not_vacuous():
    import jsonschema

    cfg = load_yaml(CLUSTER / "ray-cluster.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_launcher_schema())
    bad = copy.deepcopy(cfg)
    bad["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_launcher_schema())


def test_launcher_config_shape():
    cfg = load_yaml(CLUSTER / "ray-cluster.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["auth"]["ssh_user"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["node_config"]["InstanceType"]
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU")]
    assert gpu, "a GPU worker type"
    for t in gpu:
        assert t["min_workers"] == 0, "GPU workers scale from zero"
        assert t["resources"]["GPU"] == 1 and t["node_config"]["InstanceType"]
        assert t["max_workers"] <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    setup = " ".join(cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
                     + cfg.get("worker_setup_commands", []))
    assert "pip install" in setup and "[gpu]" in setup and "pip uninstall -y faiss-cpu" in setup


# ---- cluster/kuberay: a structural check written from KubeRay's v1 CRDs ------------------------
# (read from ray-project/kuberay ray-operator/config/crd/bases and controllers/ray/utils/validation.go;
# the CRDs themselves are not copied here)

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                      r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
INT32 = 2**31 - 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -INT32 - 1 <= v <= INT32


def check_pod_template(t, where: str, errors: list[str]) -> None:
    if not isinstance(t, dict) or not isinstance(t.get("spec"), dict):
        errors.append(f"{where}.template.spec: required object")
        return
    containers = t["spec"].get("containers")
    if not isinstance(containers, list) or not containers:
        errors.append(f"{where}.template.spec.containers: at least one container")
        return
    for i, c in enumerate(containers):
        cw = f"{where}.template.spec.containers[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not DNS1123.match(c["name"]):
            errors.append(f"{cw}.name: required DNS-1123 label")
            continue
        if not isinstance(c.get("image"), str) or not c["image"]:
            errors.append(f"{cw}.image: required")
        for kind in ("limits", "requests"):
            for k, v in (c.get("resources", {}) or {}).get(kind, {}).items():
                if not (_is_int(v) or (isinstance(v, str) and QUANTITY.match(v))):
                    errors.append(f"{cw}.resources.{kind}.{k}: {v!r} is not a quantity")
        for p in c.get("ports", []) or []:
            if not _is_int(p.get("containerPort")):
                errors.append(f"{cw}.ports: containerPort must be an integer")


def check_string_map(m, where: str, errors: list[str]) -> None:
    if m is None:
        return
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        errors.append(f"{where}: must be a map of strings (quote numbers and booleans)")


def check_ray_cluster_spec(spec, where: str, errors: list[str]) -> None:
    if not isinstance(spec, dict):
        errors.append(f"{where}: required object")
        return
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        errors.append(f"{where}.headGroupSpec: required")
        return
    check_pod_template(head.get("template"), f"{where}.headGroupSpec", errors)
    check_string_map(head.get("rayStartParams"), f"{where}.headGroupSpec.rayStartParams", errors)
    check_string_map(head.get("resources"), f"{where}.headGroupSpec.resources", errors)
    if "rayVersion" in spec and not isinstance(spec["rayVersion"], str):
        errors.append(f"{where}.rayVersion: string")
    if "enableInTreeAutoscaling" in spec and not isinstance(spec["enableInTreeAutoscaling"], bool):
        errors.append(f"{where}.enableInTreeAutoscaling: boolean")
    scaler = spec.get("autoscalerOptions") or {}
    if scaler.get("version", "v1") not in ("v1", "v2"):
        errors.append(f"{where}.autoscalerOptions.version: v1 | v2")
    auth = spec.get("authOptions") or {}
    if auth.get("mode", "token" if auth else None) not in (None, "disabled", "token"):
        errors.append(f"{where}.authOptions.mode: disabled | token")
    if auth.get("mode") == "token":
        v = tuple(int(x) for x in re.findall(r"\d+", str(spec.get("rayVersion", "0")))[:3])
        if v < (2, 52, 0):
            errors.append(f"{where}.authOptions.mode token needs rayVersion >= 2.52.0")
    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        errors.append(f"{where}.workerGroupSpecs: array")
        return
    names = set()
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        for req in ("groupName", "minReplicas", "maxReplicas", "template"):
            if req not in g:
                errors.append(f"{gw}.{req}: required")
        if not isinstance(g.get("groupName"), str):
            errors.append(f"{gw}.groupName: string")
        elif g["groupName"] in names:
            errors.append(f"{gw}.groupName: duplicate {g['groupName']!r}")
        names.add(g.get("groupName"))
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas", 0)
        if not (_is_int(lo) and _is_int(hi) and _is_int(n)):
            errors.append(f"{gw}: minReplicas / maxReplicas / replicas must be int32")
        elif not (0 <= lo <= hi) or n < 0:
            errors.append(f"{gw}: needs 0 <= minReplicas <= maxReplicas, got {lo}, {hi}")
        check_pod_template(g.get("template"), gw, errors)
        check_string_map(g.get("rayStartParams"), f"{gw}.rayStartParams", errors)
        sp = g.get("rayStartParams") or {}
        if any(sp.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errors.append(f"{gw}: resources both in rayStartParams and resources")


def check_ray_cluster(doc) -> list[str]:
    errors: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayCluster":
        errors.append("apiVersion/kind: ray.io/v1 RayCluster")
    name = (doc.get("metadata") or {}).get("name", "")
    if not (DNS1035.match(name) and len(name) <= 53):
        errors.append(f"metadata.name {name!r}: DNS-1035 label of at most 53 characters")
    check_ray_cluster_spec(doc.get("spec"), "spec", errors)
    return errors


def check_ray_job(doc) -> list[str]:
    errors: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        errors.append("apiVersion/kind: ray.io/v1 RayJob")
    name = (doc.get("metadata") or {}).get("name", "")
    if not (DNS1035.match(name) and len(name) <= 47):
        errors.append(f"metadata.name {name!r}: DNS-1035 label of at most 47 characters")
    spec = doc.get("spec") or {}
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        errors.append("spec.entrypoint: required string")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
        errors.append(f"spec.submissionMode: {mode!r}")
    if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
        errors.append("spec: one of rayClusterSpec or clusterSelector")
    if "rayClusterSpec" in spec:
        check_ray_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec", errors)
    for k in ("shutdownAfterJobFinishes", "suspend"):
        if k in spec and not isinstance(spec[k], bool):
            errors.append(f"spec.{k}: boolean")
    for k, lo in (("ttlSecondsAfterFinished", 0), ("backoffLimit", 0),
                  ("activeDeadlineSeconds", 1), ("preRunningDeadlineSeconds", 1)):
        if k in spec and not (_is_int(spec[k]) and spec[k] >= lo):
            errors.append(f"spec.{k}: int32 >= {lo}")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append("spec.ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes: true")
    if "runtimeEnvYAML" in spec:
        if not isinstance(spec["runtimeEnvYAML"], str):
            errors.append("spec.runtimeEnvYAML: a string holding YAML")
        elif not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            errors.append("spec.runtimeEnvYAML: YAML of a mapping")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec or "clusterSelector" in spec:
            errors.append("SidecarMode: no submitterPodTemplate, submitterConfig or clusterSelector")
        head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}
        head_spec = (head.get("template") or {}).get("spec") or {}
        if head_spec.get("restartPolicy") not in (None, "", "Never"):
            errors.append("SidecarMode: head restartPolicy must be Never or unset")
    return errors


def test_raycluster_manifest_has_what_kuberay_requires():
    doc = load_yaml(KUBERAY / "raycluster.yaml")
    assert check_ray_cluster(doc) == []
    spec = doc["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    gpu = [g for g in spec["workerGroupSpecs"]
           if any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
                  for c in g["template"]["spec"]["containers"])]
    assert gpu and all(g["minReplicas"] == 0 for g in gpu), "a GPU group that scales from zero"
    assert spec["enableInTreeAutoscaling"] is True
    images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    assert images == {"autoknow-ray:0.1.0-gpu"}


def test_rayjob_manifest_has_what_kuberay_requires():
    from ray.runtime_env import RuntimeEnv

    doc = load_yaml(KUBERAY / "rayjob.yaml")
    assert check_ray_job(doc) == []
    spec = doc["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "jobs/rebuild.py"]
    assert "--catalogue" in spec["entrypoint"] and "--out" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    # a loopback dashboard is reachable only from inside the head pod: the sidecar submitter
    assert spec["submissionMode"] == "SidecarMode"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    check_runtime_env(env)
    # the working_dir is a path inside the image (cluster/kuberay/Dockerfile copies the repo there)
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"COPY --chown=ray:users . {env['working_dir']}" in dockerfile
    RuntimeEnv(**{k: v for k, v in env.items() if k != "working_dir"})


def test_kuberay_checks_are_not_vacuous():
    rc = load_yaml(KUBERAY / "raycluster.yaml")
    bad = copy.deepcopy(rc)
    g = bad["spec"]["workerGroupSpecs"][0]
    g["minReplicas"], g["maxReplicas"] = 3, 1
    g["rayStartParams"] = {"num-gpus": 1}
    del bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    errors = check_ray_cluster(bad)
    assert len(errors) == 3, errors
    rj = load_yaml(KUBERAY / "rayjob.yaml")
    bad = copy.deepcopy(rj)
    del bad["spec"]["entrypoint"]
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName")
    assert len(check_ray_job(bad)) >= 4, check_ray_job(bad)


# ---- nothing unsafe ships ----------------------------------------------------------------------

def _yaml_docs(path: Path):
    if path.suffix not in (".yaml", ".yml"):
        return []
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    embedded = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "runtimeEnvYAML" and isinstance(v, str):
                    embedded.append(yaml.safe_load(v))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for d in docs:
        walk(d)
    return docs + embedded


def test_no_shipped_config_binds_to_all_interfaces():
    offenders = []
    for p in shipped_files():
        text = p.read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"0\.0\.0\.0|\[::\]|(?<![\w-])::(?![\w:])", line):
                offenders.append(f"{p.relative_to(REPO)}:{n}: {line.strip()}")
            for host in re.findall(r"dashboard[-_]host[\"']?\s*[=:]\s*[\"']?([^\s\"',}]+)", line):
                if host not in ("127.0.0.1", "localhost"):
                    offenders.append(f"{p.relative_to(REPO)}:{n}: dashboard host {host}")
    assert offenders == []


def test_embedded_default_keeps_the_dashboard_on_loopback():
    from autoknow_ray.config import Config

    assert Config().ray.dashboard_host in ("127.0.0.1", "localhost")


SECRET_KEY = re.compile(r"(secret|passw(or)?d|token|api[-_]?key|access[-_]?key|credential|private[-_]?key)",
                        re.IGNORECASE)
SECRET_SHAPES = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "hex token (a Ray auth token is 64 hex digits)": re.compile(r"\b[0-9a-f]{40,}\b"),
}


def _looks_like_reference(v: str) -> bool:
    # a path, an env/shell reference or a plain mode word, not a literal credential
    return v.startswith(("/", "~", ".", "$", "<")) or v in ("token", "disabled") or len(v) < 8


def secret_findings(path: Path) -> list[str]:
    found = []
    text = path.read_text(errors="replace")
    for what, rx in SECRET_SHAPES.items():
        if rx.search(text):
            found.append(f"{path.relative_to(REPO)}: {what}")

    def walk(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                if isinstance(k, str) and SECRET_KEY.search(k) and isinstance(v, (str, int)) \
                        and not _looks_like_reference(str(v)):
                    found.append(f"{path.relative_to(REPO)}: {where}{k} has a literal value")
                walk(v, f"{where}{k}.")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}{i}.")

    for d in _yaml_docs(path):
        walk(d, "")
    # NAME=value in commands (a shell line inside YAML, a Dockerfile ENV)
    for m in re.finditer(r"(?i)\b(\w*(?:secret|password|token|api_key)\w*)=['\"]?([^\s'\"]+)", text):
        if not _looks_like_reference(m.group(2)):
            found.append(f"{path.relative_to(REPO)}: {m.group(1)}={m.group(2)[:4]}…")
    return found


def test_no_shipped_config_holds_a_secret():
    findings = [f for p in shipped_files() for f in secret_findings(p)]
    assert findings == []


def test_secret_check_is_not_vacuous(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    p = tmp_path / "leaky.yaml"
    p.write_text("provider:\n  aws_secret_access_key: wJalrXUtnFEMIK7MDENGbPxRfiCY\n"
                 "redisPassword: hunter2hunter2\nenv_vars:\n  RAY_AUTH_TOKEN: " + "ab" * 32 + "\n"
                 "setup_commands:\n  - RAY_AUTH_TOKEN=s3cr3t-v4lue ray start --head\n")
    assert len(secret_findings(p)) >= 4


UNPICKLERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("joblib", "load"),
              ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"), ("pd", "read_pickle"),
              ("pandas", "read_pickle")}


def unpickling_calls(path: Path) -> list[str]:
    """Calls that can unpickle an artifact: torch.load without weights_only=True, pickle/joblib
    loads always, numpy loads with allow_pickle=True."""
    src = path.read_text(errors="replace")
    try:
        tree = ast.parse(src)
    except SyntaxError:  # a file mid-edit: fall back to a textual check
        return [f"{path}:{n}: {line.strip()}" for n, line in enumerate(src.splitlines(), 1)
                if re.search(r"(torch\.load|pickle\.loads?|joblib\.load)\(", line)
                and "weights_only=True" not in line]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        kw = {k.arg: k.value for k in node.keywords}
        safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if (owner, node.func.attr) in UNPICKLERS and not (owner == "torch" and safe):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.{node.func.attr}(…)")
        if node.func.attr == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                and kw["allow_pickle"].value is True:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: load(…, allow_pickle=True)")
    return found


def test_artifacts_never_unpickle():
    files = sorted((REPO / "autoknow_ray").rglob("*.py")) + sorted((REPO / "jobs").rglob("*.py"))
    assert files
    assert [f for p in files for f in unpickling_calls(p)] == []


def test_unpickle_check_is_not_vacuous(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    p = tmp_path / "m.py"
    p.write_text("import torch, pickle, numpy as np\n"
                 "a = torch.load(f)\n"
                 "b = torch.load(f,\n    weights_only=True)\n"
                 "c = pickle.load(f)\n"
                 "d = np.load(f, allow_pickle=True)\n")
    assert [x.split(":")[1] for x in unpickling_calls(p)] == ["2", "5", "6"]
