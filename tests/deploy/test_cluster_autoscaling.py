"""Ray cluster autoscaling with Ray's real autoscaler: ``deploy.fakecluster`` starts a head and the
autoscaler with the fake multi-node provider, as ``ray.cluster_utils.AutoscalingCluster`` does
(worker nodes are raylets on this machine; the module says why it does not call that class). The Generator needs a custom resource only worker nodes have, so when Serve scales
it from 1 to 2 replicas the autoscaler must add a node, and remove it once the load has ended
and the replica is gone. Node counts come from Ray's state API, replica counts from Serve's."""

from __future__ import annotations

import os
import threading
import time

import pytest

from deploy_helpers import QUESTIONS, REDIS_URL, free_port, load_until, running_replicas, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

APP = "specrag"
NODE_RESOURCE = "generator_node"      # what every Generator replica asks for, one per worker node


def alive_worker_nodes() -> int:
    from deploy.fakecluster import alive_nodes

    return alive_nodes(NODE_RESOURCE)


def running_generators() -> int:
    return running_replicas(APP, "Generator")


@pytest.fixture
def cluster(monkeypatch):
    from deploy.fakecluster import LocalAutoscalingCluster

    env = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_USAGE_STATS_ENABLED": "0"}
    c = LocalAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"generator.worker": {"resources": {"CPU": 1, NODE_RESOURCE: 1},
                                                "node_config": {}, "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=0.1)     # an idle worker node goes after 6 s
    c.start(env)
    try:
        yield env
    finally:
        import ray

        try:
            ray.shutdown()
        finally:
            c.shutdown()


def test_autoscaler_adds_a_node_for_a_replica_and_removes_it(cluster, deploy_index):
    import httpx
    from ray import serve

    from deploy import local
    from deploy.config import ServeConfig

    local.init_ray(address="auto", log_to_driver=False, runtime_env={"env_vars": cluster})
    config = ServeConfig.model_validate({
        "pipeline": {"index_dir": str(deploy_index), "redis_url": REDIS_URL, "max_tokens": 16, "k": 1},
        "torch_threads": 1,
        "ingress": {"num_cpus": 0.1},
        "retriever": {"num_cpus": 0.2},
        "generator": {"num_cpus": 0.5, "resources": {NODE_RESOURCE: 1}, "max_ongoing_requests": 8,
                      "health_check_timeout_s": 60,
                      "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                      "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2, "metrics_interval_s": 0.5}},
    })
    url = local.start_service(config, port=free_port(), app_name=APP)   # waits for the first node
    try:
        local.wait_healthy(url, timeout_s=180)
        assert alive_worker_nodes() == 1 and running_generators() == 1

        timeline, stop = [], threading.Event()
        t0 = time.monotonic()

        def poll():
            while not stop.is_set():
                try:
                    timeline.append((round(time.monotonic() - t0, 1), running_generators(), alive_worker_nodes()))
                except Exception:  # noqa: BLE001 - a state call during a scale event; try again
                    pass
                stop.wait(1.0)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        body = lambda i: {"model": "smollm2-135m-instruct", "max_tokens": 32, "temperature": 0,  # noqa: E731
                          "messages": [{"role": "user", "content": f"{QUESTIONS[i % 4]} Variant {i}."}]}
        # 40 requests, and on (up to 160) until the second replica runs on its new node
        statuses = load_until(lambda i: httpx.post(url + "/v1/chat/completions", json=body(i), timeout=180).status_code,
                              lambda: any(r == 2 for _, r, _ in timeline), clients=8, min_requests=40, max_requests=160)
        peak_nodes = max(n for _, _, n in timeline)
        peak_replicas = max(r for _, r, _ in timeline)
        wait_for(lambda: running_generators() == 1, 90, "Serve scaling back to one Generator replica")
        wait_for(lambda: alive_worker_nodes() == 1, 120, "the autoscaler removing the idle worker node")
        stop.set()
        poller.join(5)
        print(f"\n(s, Generator replicas, worker nodes): {timeline}")
        assert len(statuses) >= 40 and statuses == [200] * len(statuses), statuses
        assert peak_replicas == 2, timeline
        assert peak_nodes == 2, f"the autoscaler never added a node: {timeline}"
    finally:
        serve.shutdown()
