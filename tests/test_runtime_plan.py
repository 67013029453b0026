"""The resource plan: GPU pools are planned on what the cluster may scale to, not only on what is
up now; CPU plans leave room for the read and write tasks."""
from __future__ import annotations

from autoknow_ray.config import Config
from autoknow_ray.runtime import plan_actors

# a head with 4 CPUs now; GPU workers (1 GPU each, up to 8) that scale from zero
SCALES_FROM_ZERO = {"cpus": 4.0, "gpus": 0.0, "max_gpus": 8.0}


def test_zero_gpus_now_and_eight_allowed_asks_for_gpu_actors():
    plan = plan_actors(Config(), "taxonomy", cluster=SCALES_FROM_ZERO)
    assert plan.device == "cuda"
    assert plan.num_gpus == 0.5 and plan.actors == 16  # two actors per GPU, eight GPUs
    assert plan.num_cpus == 1.0  # a GPU actor leaves its node's other CPUs to reading


def test_the_config_can_state_the_gpus_and_turn_them_off():
    cfg = Config.model_validate({"ray": {"max_gpus": 2}})
    assert plan_actors(cfg, "taxonomy", cluster=SCALES_FROM_ZERO).actors == 4
    cpu = Config.model_validate({"device": "cpu"})
    plan = plan_actors(cpu, "taxonomy", cluster=SCALES_FROM_ZERO)
    assert (plan.device, plan.num_gpus) == ("cpu", 0.0)


def test_without_an_autoscaler_the_plan_uses_what_is_there():
    plan = plan_actors(Config(), "taxonomy", cluster={"cpus": 2.0, "gpus": 0.0})
    # (2 CPUs - 1 reserved for read/write tasks) / 0.5 CPU per actor
    assert (plan.device, plan.actors, plan.num_cpus) == ("cpu", 2, 0.5)
    small = plan_actors(Config(), "taxonomy", n_rows=10, cluster={"cpus": 2.0, "gpus": 0.0})
    assert small.actors == 1  # one batch: a second actor would only cost a model load


def test_a_folder_another_node_cannot_see_stops_the_job(tmp_path):
    import pytest

    from autoknow_ray.runtime import check_shared_storage

    run = tmp_path / "run"
    run.mkdir()
    seen = []

    def probe(node, sentinel, token):
        seen.append((node, open(sentinel).read() == token))
        return node != "node-b"  # node-b has its own local disk

    with pytest.raises(RuntimeError, match=r"node node-b.*cannot see the run folder"):
        check_shared_storage({"run": run}, nodes=["node-a", "node-b"], probe=probe)
    assert seen == [("node-a", True), ("node-b", True)]
    assert not list(run.iterdir()), "the token file is removed"
    check_shared_storage({"run": run}, nodes=["node-a"], probe=probe)  # every node sees it: fine
