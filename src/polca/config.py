"""Run configuration: pydantic models of a TOML file, validated with clear errors.

Every section forbids unknown keys, so a typo stops the run before anything is written.

Example:
    >>> cfg = RunConfig.model_validate({"name": "x", "task": {"kind": "addition"}})
    >>> cfg.train.optimizer
    'adamw'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file is missing, not TOML, or has an unknown key or a bad value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(Section):
    kind: Literal["addition", "moving_window_sum", "prefix_sum", "reversed_addition", "text",
                  "jsonl", "external"] = "addition"
    n_probe: int = Field(1250, gt=0, description="probe problems (addition: 4 scored tokens each)")
    digits: int = Field(3, ge=1, le=6, description="operand digits (addition)")
    options: dict = Field(default_factory=dict, description="task-specific settings")


class ModelConfig(Section):
    n_layers: int = Field(2, ge=1)
    d_model: int = Field(128, ge=1)
    n_heads: int = Field(4, ge=1)
    d_mlp: int | None = Field(None, ge=1)
    tied_head: bool = False
    attention: Literal["softmax", "linear"] = "softmax"
    context_length: int | None = Field(None, ge=1, description="default: the task's length")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        return self


class TrainConfig(Section):
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 turns clipping off")
    device: str = "cpu"


class CheckpointConfig(Section):
    every: int | None = Field(None, gt=0, description="a checkpoint every N steps")
    steps: list[int] | None = Field(None, description="an explicit list of steps")
    log_spaced: int | None = Field(None, gt=1, description="N log-spaced steps")

    @model_validator(mode="after")
    def _one_schedule(self):
        given = [k for k in ("every", "steps", "log_spaced") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one checkpoint schedule, not {given}")
        if not given:
            self.every = 100
        return self


class TrajectoryConfig(Section):
    batch_size: int = Field(1024, gt=0, description="probe sequences per forward pass")


class BasisConfig(Section):
    kinds: list[Literal["hessian", "random", "shuffled-hessian", "trajectory-pca", "user"]] = [
        "hessian"]
    every: int = Field(200, gt=0, description="training steps between basis checkpoints")
    per_checkpoint: int = Field(1, ge=1, description="eigenvectors per basis checkpoint (k)")
    max_vectors: int | None = Field(None, ge=1, description="cap on m")
    sample_size: int = Field(1250, gt=0, description="basis sample: training sequences")
    tol: float = Field(1e-3, gt=0, description="Lanczos tolerance")
    solver: Literal["eigsh", "lanczos"] = "lanczos"
    dtype: Literal["float32", "float64"] = "float64"
    user_path: str | None = Field(None, description="safetensors file with 'vectors' [m, d]")
    seed: int = 0


class DecomposeConfig(Section):
    basis: list[str] | None = Field(None, description="bases to decompose on (default: all)")
    curvature: list[Literal["exact", "paper"]] = ["exact", "paper"]
    integrated: bool = True
    simpson_points: int = Field(3, ge=3)
    fisher: bool = True
    lca: bool = True
    lca_top_parameters: int = Field(50, gt=0)
    engine: Literal["auto", "jet", "forward", "reverse"] = "auto"
    batch_size: int = Field(512, gt=0, description="probe sequences per chunk")
    dtype: Literal["float32", "float64"] = Field(
        "float64", description="model arithmetic; projections accumulate in float64 either way")
    denominator_tol: float = Field(1e-12, ge=0)


class ClusterConfig(Section):
    trajectories: list[str] = Field(
        default_factory=lambda: ["loss", "delta_loss", "abs_delta_loss", "polca", "first_order",
                                 "polca_paper", "integrated", "fisher", "lca"])
    mean_filter: bool = True
    token_filter: bool = True
    min_cluster_size: int | None = Field(None, gt=1, description="default: 150 per 5000 tokens")
    min_samples: int | None = Field(None, gt=0, description="default: tokens / 15")
    top_clusters: int = Field(3, gt=0)
    break_delta: int | None = Field(None, gt=0, description="Δ in steps for break times")
    flat_after: int | None = Field(None, ge=0, description="τ in steps; default: 90% of decrease")


class ReportConfig(Section):
    examples_per_cluster: int = Field(10, gt=0)


class RunConfig(Section):
    name: str
    seed: int = 0
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoints: CheckpointConfig = CheckpointConfig()
    trajectories: TrajectoryConfig = TrajectoryConfig()
    basis: BasisConfig = BasisConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    cluster: ClusterConfig = ClusterConfig()
    report: ReportConfig = ReportConfig()


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run config; every problem is reported with its key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return parse_config(data, source=str(path))


def parse_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            if e["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key; remove it or fix its spelling")
            else:
                lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"{source} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as TOML (written to runs/NAME/config.toml)."""
    return _to_toml(cfg.model_dump(mode="json", exclude_none=True))


def _to_toml(data: dict, prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) or not v}
    tables = {k: v for k, v in data.items() if isinstance(v, dict) and v}
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for key, table in tables.items():
        name = f"{prefix}{key}"
        lines += ["", f"[{name}]", _to_toml(table, prefix=f"{name}.").strip()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)
