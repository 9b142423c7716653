"""Cluster manifests generated from ``deploy/serve.yaml`` (``specrag manifests``).

One Serve config is the source of truth; ``deploy/cluster/overrides.yaml`` holds everything a
cluster changes (index volume, Redis URL, model path, resources, images, node groups). From the
two this module writes:

- ``rayservice.yaml``: a KubeRay ``RayService`` (head + CPU and GPU worker groups, in-tree
  autoscaling on) whose ``serveConfigV2`` is the merged Serve config;
- ``serve-cluster.yaml``: the merged Serve config itself (``serve deploy`` on a VM cluster);
- ``ray-cluster.yaml``: the ``ray up`` cluster launcher config (head + the same worker groups,
  the Ray autoscaler), which mounts ``serve-cluster.yaml`` on the head node.

The output is deterministic, so a test regenerates it and fails when the committed files are
stale. The merged Serve config is validated by ``ServeConfig`` before anything is written.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVE = ROOT / "deploy" / "serve.yaml"
DEFAULT_OUT = ROOT / "deploy" / "cluster"
OVERRIDES_NAME = "overrides.yaml"
FILES = ("rayservice.yaml", "serve-cluster.yaml", "ray-cluster.yaml")
SERVE_MOUNT = "~/specrag/serve-cluster.yaml"        # where ray-cluster.yaml puts the Serve config


class ManifestError(ValueError):
    """The serve config or the overrides cannot make a valid manifest."""


def merge(base: Any, over: Any) -> Any:
    """``over`` merged into a copy of ``base``: mappings key by key, anything else replaced.
    A list of mappings with ``name`` keys (Serve's ``applications``) is merged by name from a
    mapping ``{name: override}``."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(over, dict) and all(isinstance(b, dict) and "name" in b for b in base):
        names = [b["name"] for b in base]
        unknown = sorted(set(over) - set(names))
        if unknown:
            raise ManifestError(f"overrides name applications {unknown}; the serve config has {names}")
        return [merge(b, over[b["name"]]) if b["name"] in over else copy.deepcopy(b) for b in base]
    return copy.deepcopy(over)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    return data


def cluster_serve_config(serve: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The Serve config a cluster runs: ``serve`` with ``overrides['serve']`` merged in, every
    application's ``args`` validated by ``ServeConfig``."""
    from pydantic import ValidationError

    from deploy.config import ServeConfig

    merged = merge(serve, overrides.get("serve") or {})
    for app in merged.get("applications") or []:
        try:
            ServeConfig.model_validate(app.get("args") or {})
        except ValidationError as exc:
            raise ManifestError(f"application {app.get('name')!r}: the merged args are not a valid serve "
                                f"config:\n{exc}") from None
    return merged


def _env(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    secret = overrides.get("api_key_secret")
    return ([{"name": "SPECRAG_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "api-key",
                                                                         "optional": True}}}]
            if secret else [])


def _volumes(overrides: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    vols, mounts = [], []
    for name, (claim, path) in (overrides.get("volumes") or {}).items():
        vols.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": name, "mountPath": path})
    return vols, mounts


def rayservice(serve_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The KubeRay RayService (ray.io/v1) running ``serve_config``."""
    vols, mounts = _volumes(overrides)
    env = _env(overrides)
    head = overrides.get("head") or {}

    def container(name: str, image: str, cpu: str, memory: str, gpus: int, ports: list | None = None) -> dict:
        limits: dict[str, Any] = {"cpu": str(cpu), "memory": str(memory)}
        if gpus:
            limits["nvidia.com/gpu"] = str(gpus)
        c: dict[str, Any] = {"name": name, "image": image, "resources": {"limits": limits, "requests": limits}}
        if ports:
            c["ports"] = ports
        if env:
            c["env"] = env
        if mounts:
            c["volumeMounts"] = mounts
        return c

    def pod(c: dict[str, Any]) -> dict[str, Any]:
        spec: dict[str, Any] = {"containers": [c]}
        if vols:
            spec["volumes"] = vols
        return {"spec": spec}

    groups = []
    for name, g in (overrides.get("worker_groups") or {}).items():
        gpus = int(g.get("gpus") or 0)
        image = overrides["gpu_image"] if gpus else overrides["image"]
        groups.append({"groupName": name, "replicas": int(g["min"]), "minReplicas": int(g["min"]),
                       "maxReplicas": int(g["max"]), "rayStartParams": {},
                       "template": pod(container("ray-worker", image, g["cpu"], g["memory"], gpus))})
    ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "specrag"},
        "spec": {
            "serveConfigV2": dump(serve_config),
            "rayClusterConfig": {
                "rayVersion": str(overrides["ray_version"]),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default",
                                      "idleTimeoutSeconds": int(overrides.get("idle_timeout_s", 300))},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": pod(container("ray-head", overrides["image"], head.get("cpu", "2"),
                                              head.get("memory", "8Gi"), 0, ports)),
                },
                "workerGroupSpecs": groups,
            },
        },
    }


def ray_cluster(overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``ray up`` cluster launcher config: head + the worker groups, the Ray autoscaler, the
    Serve config mounted on the head (``serve deploy`` it once the index is built)."""
    up = overrides.get("ray_up") or {}
    instances = up.get("instances") or {}
    groups = overrides.get("worker_groups") or {}
    node_types: dict[str, Any] = {
        "head": {"node_config": {"InstanceType": up.get("head_instance", "m6i.xlarge")},
                 "resources": {"CPU": 0}},        # no replicas on the head
    }
    for name, g in groups.items():
        gpus = int(g.get("gpus") or 0)
        node_types[f"{name}_worker"] = {
            "node_config": {"InstanceType": instances.get(name, "m6i.2xlarge")},
            "resources": {"CPU": int(g["cpu"]), **({"GPU": gpus} if gpus else {})},
            "min_workers": int(g["min"]), "max_workers": int(g["max"]),
        }
    any_gpu = any(int(g.get("gpus") or 0) for g in groups.values())
    return {
        "cluster_name": "specrag",
        "max_workers": sum(int(g["max"]) for g in groups.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": max(1, int(overrides.get("idle_timeout_s", 300)) // 60),
        "provider": up.get("provider") or {"type": "aws", "region": "us-west-2"},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {"image": overrides["gpu_image"] if any_gpu else overrides["image"], "container_name": "ray",
                   "pull_before_run": True},
        "file_mounts": {SERVE_MOUNT: "deploy/cluster/serve-cluster.yaml"},
        "setup_commands": [up["install"]] if up.get("install") else [],
        "head_start_ray_commands": [
            "ray stop",
            "ray start --head --num-cpus=0 --port=6379 --dashboard-host=0.0.0.0 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
        "available_node_types": node_types,
        "head_node_type": "head",
    }


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people: no anchors, multi-line strings (``serveConfigV2``) as ``|`` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


HEADER = """\
# GENERATED by `specrag manifests --from {serve} --out {out}` from {serve} and
# {overrides}: do not edit (a test fails when this file is stale). {what}
"""

WHAT = {
    "rayservice.yaml": "KubeRay RayService:\n#   kubectl apply -f deploy/cluster/rayservice.yaml\n"
                       "#   kubectl port-forward svc/specrag-serve-svc 8000:8000",
    "serve-cluster.yaml": "The Serve config of a VM cluster\n# (ray-cluster.yaml mounts it at "
                          f"{SERVE_MOUNT}):\n#   serve deploy {SERVE_MOUNT}",
    "ray-cluster.yaml": "Ray cluster launcher:\n#   ray up deploy/cluster/ray-cluster.yaml\n"
                        f"#   ray exec deploy/cluster/ray-cluster.yaml 'serve deploy {SERVE_MOUNT}'",
}


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def build(serve_path: Path = DEFAULT_SERVE, overrides_path: Path | None = None,
          out_dir: Path = DEFAULT_OUT) -> dict[str, str]:
    """The manifests' text by file name (nothing written)."""
    overrides_path = overrides_path or out_dir / OVERRIDES_NAME
    serve = _read_yaml(serve_path, "serve config")
    overrides = _read_yaml(overrides_path, "cluster overrides")
    missing = [k for k in ("ray_version", "image", "gpu_image", "worker_groups") if k not in overrides]
    if missing:
        raise ManifestError(f"{overrides_path}: missing {', '.join(missing)}")
    serve_config = cluster_serve_config(serve, overrides)
    docs = {"rayservice.yaml": rayservice(serve_config, overrides), "serve-cluster.yaml": serve_config,
            "ray-cluster.yaml": ray_cluster(overrides)}
    header = {"serve": _rel(serve_path), "out": _rel(out_dir) + "/", "overrides": _rel(overrides_path)}
    return {name: HEADER.format(what=WHAT[name], **header) + dump(doc)
            for name, doc in docs.items()}


def write(serve_path: Path = DEFAULT_SERVE, out_dir: Path = DEFAULT_OUT, overrides_path: Path | None = None,
          check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) the manifests; returns the files written or stale.
    Everything is built before anything is written, so a bad config writes nothing."""
    texts = build(serve_path, overrides_path, out_dir)
    changed = [name for name, text in texts.items()
               if not (out_dir / name).exists() or (out_dir / name).read_text() != text]
    if not check:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in changed:
            tmp = out_dir / f".{name}.tmp"
            tmp.write_text(texts[name])
            tmp.replace(out_dir / name)
    return changed
