"""The serving layer's one configuration object.

The same object is built from the ``args`` of ``deploy/serve.yaml`` (for ``serve run``), from
``specrag serve --config FILE`` (either that YAML or a plain mapping of the same fields) and
from CLI flags, so every way of starting the service reads one schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config import PipelineConfig


class AutoscalingSettings(BaseModel):
    """Ray Serve's request-based autoscaling for one deployment (``autoscaling_config``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    # window the ongoing-request average is taken over (Serve's default 30 s), and how often
    # metrics are taken (None: Serve's default, 10 s; Serve wants the window longer than it)
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class DeploymentSettings(BaseModel):
    """Resources and scaling of one deployment. ``autoscaling`` None: a fixed ``num_replicas``."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # custom Ray resources each replica needs, e.g. {"generator_node": 1} to place replicas only
    # on nodes started with that resource (the cluster autoscaler then adds such nodes)
    resources: dict[str, float] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(8, ge=1)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  **({"resources": dict(self.resources)} if self.resources else {})},
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _default_ingress() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.1, max_ongoing_requests=64)


def _default_retriever() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.25, max_ongoing_requests=32)


def _default_generator() -> DeploymentSettings:
    # one engine loop per replica batches up to pipeline.max_batch (16) requests per forward
    return DeploymentSettings(num_cpus=0.5, max_ongoing_requests=16)


_DEPLOYMENT_DEFAULTS = {"ingress": _default_ingress, "retriever": _default_retriever, "generator": _default_generator}


class ServeConfig(BaseModel):
    """Everything ``build_app`` needs: the pipeline to load and how to deploy it."""

    model_config = ConfigDict(extra="forbid")

    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    # Name clients pass as ``model``; None: the pipeline's model name. ``model_aliases`` are
    # other names accepted for the same model (anything else is a 404).
    served_model_name: str | None = None
    model_aliases: list[str] = Field(default_factory=list)
    # Optional bearer token for /v1/*; None: open. ``api_key_env`` names an environment
    # variable to read it from (keeps secrets out of the YAML).
    api_key: str | None = None
    api_key_env: str | None = "SPECRAG_API_KEY"
    # Query batching in the Retriever (``@serve.batch``). A batch takes every query queued while
    # the previous one ran, so batches form under load even with no wait; a non-zero wait is
    # added to every lone request's latency (5 ms was a third of the 15 ms overhead budget).
    retrieval_batch_size: int = Field(16, ge=1)
    retrieval_batch_wait_s: float = Field(0.0, ge=0)
    # Module providing RetrievalStage and GenerationStage (the pipeline's; tests substitute a
    # stand-in, other implementations of the stage contract plug in here).
    stages_module: str = "pipeline.rag"
    # Threads torch (and our kernels) use inside each Generator replica; None: every CPU the
    # replica may run on (Ray would set 1 for a num_cpus below 2). Set it when replicas share a node.
    torch_threads: int | None = Field(None, ge=1)
    ingress: DeploymentSettings = Field(default_factory=_default_ingress)
    retriever: DeploymentSettings = Field(default_factory=_default_retriever)
    generator: DeploymentSettings = Field(default_factory=_default_generator)

    @field_validator("ingress", "retriever", "generator", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any, info: Any) -> Any:
        """A partial mapping overrides that deployment's own defaults, not the generic ones
        (``generator: {num_cpus: 1}`` keeps the Generator's max_ongoing_requests)."""
        if isinstance(value, dict):
            defaults = _DEPLOYMENT_DEFAULTS[info.field_name]().model_dump(exclude_unset=False)
            if "autoscaling" in value:       # given as a whole (or null), not merged
                defaults.pop("autoscaling", None)
            return {**defaults, **value}
        return value

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.pipeline.model

    def accepted_model_names(self) -> set[str]:
        return {self.model_name, self.pipeline.model, *self.model_aliases}

    def resolved_api_key(self) -> str | None:
        import os

        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


def load_stages(module: str) -> Any:
    """The module holding the stage classes, imported late (it pulls in torch)."""
    import importlib

    return importlib.import_module(module)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a serve config: a ``serve run`` YAML (the first application's ``args``) or a
    plain mapping of ``ServeConfig`` fields (YAML or JSON)."""
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if "applications" in data:
        apps = data["applications"] or []
        if not apps:
            raise ValueError(f"{path}: 'applications' is empty")
        data = apps[0].get("args") or {}
    return data
