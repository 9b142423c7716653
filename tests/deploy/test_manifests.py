"""Cluster manifests are generated from deploy/serve.yaml, never hand-copied: the committed files
equal a fresh generation, parse, pass Ray's own schemas, and differ from deploy/serve.yaml only
where deploy/cluster/overrides.yaml says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import manifests

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "cluster"


def _leaves(doc, prefix=()):
    """{path: value} of every scalar / list leaf (applications keyed by name)."""
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            out.update(_leaves(v, prefix + (k,)))
        return out
    if isinstance(doc, list) and doc and all(isinstance(d, dict) and "name" in d for d in doc):
        out = {}
        for d in doc:
            out.update(_leaves(d, prefix + (d["name"],)))
        return out
    return {prefix: doc}


def test_committed_manifests_are_fresh():
    stale = manifests.write(check=True)
    assert not stale, (f"stale generated manifests {stale}: run `specrag manifests --from deploy/serve.yaml "
                       f"--out deploy/cluster/` and commit")


def test_serve_config_is_serve_yaml_plus_the_overrides_only():
    serve = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    overrides = yaml.safe_load((CLUSTER / "overrides.yaml").read_text())
    rayservice = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    from_rayservice = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    from_file = yaml.safe_load((CLUSTER / "serve-cluster.yaml").read_text())
    assert from_rayservice == from_file

    base, got = _leaves(serve), _leaves(from_file)
    over = _leaves(overrides["serve"])
    # overridden leaves carry the override's value ...
    for path, value in over.items():
        assert got[path] == value, path
    # ... and every other leaf is deploy/serve.yaml's, none lost, none added
    assert set(got) == set(base) | set(over)
    for path, value in base.items():
        if path not in over:
            assert got[path] == value, path
    # the overrides really change something the cluster needs
    app = from_file["applications"][0]["args"]
    assert app["pipeline"]["index_dir"] == "/data/index" and app["pipeline"]["redis_url"].startswith("redis://")
    assert app["generator"]["num_gpus"] == 1


def test_manifests_pass_rays_own_schemas():
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.serve.schema import ServeDeploySchema

    from deploy.config import ServeConfig

    serve = yaml.safe_load((CLUSTER / "serve-cluster.yaml").read_text())
    ServeDeploySchema.model_validate(serve) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve)
    for app in serve["applications"]:
        ServeConfig.model_validate(app["args"])

    cluster = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cluster))
    assert cluster["file_mounts"][manifests.SERVE_MOUNT] == "deploy/cluster/serve-cluster.yaml"
    assert {"head", "cpu_worker", "gpu_worker"} <= set(cluster["available_node_types"])
    assert cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1

    rs = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["minReplicas"] <= groups["gpu"]["replicas"] <= groups["gpu"]["maxReplicas"]


def _cli(*args, cwd=ROOT):
    cli = Path(sys.executable).with_name("specrag")
    return subprocess.run([str(cli), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_writes_checks_and_rejects_bad_overrides(tmp_path):
    out = tmp_path / "cluster"
    out.mkdir()
    shutil.copy(CLUSTER / "overrides.yaml", out / "overrides.yaml")
    r = _cli("manifests", "--from", "deploy/serve.yaml", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in manifests.FILES:
        assert (out / name).read_text().split("\n", 2)[2] == (CLUSTER / name).read_text().split("\n", 2)[2]
    assert _cli("manifests", "--out", str(out), "--check").returncode == 0

    (out / "rayservice.yaml").write_text("edited by hand\n")
    r = _cli("manifests", "--out", str(out), "--check")
    assert r.returncode == 1 and "rayservice.yaml: stale" in r.stderr

    # an override that is not a valid serve config: a clear error, nothing written
    bad = yaml.safe_load((out / "overrides.yaml").read_text())
    bad["serve"]["applications"]["specrag"]["args"]["generator"]["num_gpus"] = -1
    (out / "overrides.yaml").write_text(yaml.safe_dump(bad))
    before = {n: (out / n).read_text() for n in manifests.FILES}
    r = _cli("manifests", "--out", str(out))
    assert r.returncode != 0 and "num_gpus" in r.stderr and "Traceback" not in r.stderr
    assert {n: (out / n).read_text() for n in manifests.FILES} == before

    bad["serve"]["applications"] = {"nope": {}}
    (out / "overrides.yaml").write_text(yaml.safe_dump(bad))
    r = _cli("manifests", "--out", str(out))
    assert r.returncode != 0 and "nope" in r.stderr


def test_merge_rules():
    base = {"a": {"b": 1, "c": [1, 2]}, "apps": [{"name": "x", "v": 1}, {"name": "y", "v": 2}]}
    got = manifests.merge(base, {"a": {"c": [3]}, "apps": {"y": {"v": 5}}})
    assert got == {"a": {"b": 1, "c": [3]}, "apps": [{"name": "x", "v": 1}, {"name": "y", "v": 5}]}
    assert base["apps"][1]["v"] == 2       # the input is not modified
    with pytest.raises(manifests.ManifestError, match="z"):
        manifests.merge(base, {"apps": {"z": {}}})
