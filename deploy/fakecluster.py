"""A Ray cluster with Ray's real autoscaler on one machine: the fake multi-node provider starts
each "worker node" as a raylet here. For trying the
cluster-autoscaling path locally; the tests and ``benchmarks/bench_scale.py`` use it.

This follows ``ray.cluster_utils.AutoscalingCluster`` (same provider, same environment, same
``ray start --head --autoscaling-config``) with two differences: that class reads a base config
from ``autoscaler/_private/fake_multi_node/example.yaml``, which the Ray wheel does not ship (the
base config is written here, with the cluster launcher's own fields), and it starts the head on
Ray's default GCS port 6379, which is Redis's port (taken on every machine that runs specrag
with Redis); the head here takes a free port, and the provider is told it (``gcs_address``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _base_config(head_resources: dict[str, Any], worker_node_types: dict[str, Any],
                 idle_timeout_minutes: float) -> dict[str, Any]:
    return {
        "cluster_name": "specrag-local", "max_workers": 8, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {**worker_node_types,
                                 "ray.head.default": {"resources": dict(head_resources), "node_config": {},
                                                      "max_workers": 0}},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


class LocalAutoscalingCluster:
    """Head + autoscaler (``ray start --head --autoscaling-config``) with worker node types
    that the autoscaler adds and removes on demand. ``start`` stops any Ray on this machine
    first (``ray stop --force``, as AutoscalingCluster does); connect with
    ``ray.init(address="auto")``."""

    def __init__(self, head_resources: dict[str, Any], worker_node_types: dict[str, Any],
                 idle_timeout_minutes: float = 0.1):
        self.head_resources = dict(head_resources)
        self.config = _base_config(head_resources, worker_node_types, idle_timeout_minutes)
        self.port: int | None = None

    def _ray(self, *args: str, env: dict[str, str] | None = None) -> None:
        # this interpreter's `ray` CLI, not whatever PATH finds
        subprocess.check_call([str(Path(sys.executable).with_name("ray")), *args], env=env)

    def start(self, env: dict[str, str] | None = None) -> None:
        import ray

        self._ray("stop", "--force")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        # the fake provider starts worker raylets against 6379 unless told the head's address
        self.config["provider"]["gcs_address"] = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        fd, path = tempfile.mkstemp(suffix=".json", prefix="specrag-fakecluster-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.config, f)
        res = dict(self.head_resources)
        cmd = ["start", "--head", f"--port={self.port}", f"--autoscaling-config={path}",
               f"--num-cpus={res.pop('CPU', 1)}", f"--num-gpus={res.pop('GPU', 0)}"]
        if res:
            cmd.append(f"--resources={json.dumps(res)}")
        # what AutoscalingCluster sets: the fake provider, and an autoscaler loop of 1 s
        full_env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **(env or {})}
        self._ray(*cmd, env=full_env)
        ray._private.services.find_gcs_addresses.cache_clear()

    def shutdown(self) -> None:
        import ray

        self._ray("stop", "--force")
        ray._private.services.find_gcs_addresses.cache_clear()


def alive_nodes(resource: str | None = None) -> int:
    """Alive worker nodes (with ``resource``, only those that have it), from Ray's state API
    (served by the head's dashboard, which ``ray start --head`` runs)."""
    from ray.util.state import list_nodes

    # the state API counts dead nodes against its page and, by default, raises when a page is
    # short (seen as a node was being removed): ask for a large page, take what is there
    nodes = list_nodes(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    return sum(1 for n in nodes
               if not n.is_head_node and (resource is None or resource in (n.resources_total or {})))
