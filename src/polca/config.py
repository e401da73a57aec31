"""Run configuration: pydantic models of a TOML file, validated with clear errors.

Every section forbids unknown keys, so a typo stops the run before anything is written.

Example:
    >>> cfg = RunConfig.model_validate({"name": "x", "task": {"kind": "addition"}})
    >>> cfg.train.optimizer
    'adamw'
"""

from __future__ import annotations

from importlib import resources
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
                  "jsonl", "probe-file"] = "addition"
    n_probe: int = Field(1250, gt=0, description="probe problems (addition: 4 scored tokens each)")
    digits: int = Field(3, ge=1, le=6, description="operand digits (addition)")
    options: dict = Field(default_factory=dict, description="task-specific settings")


class SourceConfig(Section):
    """Where the model and its checkpoints come from (:mod:`polca.sources`).

    ``train``: the built-in decoder, trained by polca (sections model, train, checkpoints).
    ``hf``: a series of Hugging Face checkpoints (``path``: a glob of ``save_pretrained``
    folders, their parent folder, a hub cache ``models--org--name`` with ``revisions``, or a
    series manifest ``.json``). ``state-dict``: state-dict files of any PyTorch model
    (``path``: a glob, a folder or a list) and ``factory``, the ``"module:function"`` that
    builds it. Paths are taken from the current directory.
    """

    kind: Literal["train", "hf", "state-dict"] = "train"
    path: str | list[str] | None = None
    revisions: list[str] | None = None
    steps: list[int] | None = Field(None, description="training steps of the checkpoints")
    factory: str | None = None
    factory_kwargs: dict = Field(default_factory=dict)
    loss_fn: str | None = Field(None, description='"module:function" (logits, batch) -> [tokens]')
    include: list[str] | None = Field(None, description="parameter globs forming θ")
    tokens_per_step: int | None = Field(
        None, gt=0, description="hf: training tokens per step (default: Pythia's for "
                                "EleutherAI/pythia-* caches, else unknown)")

    @model_validator(mode="after")
    def _complete(self):
        outside = {"path": self.path, "revisions": self.revisions, "steps": self.steps,
                   "factory": self.factory, "factory_kwargs": self.factory_kwargs,
                   "loss_fn": self.loss_fn, "include": self.include,
                   "tokens_per_step": self.tokens_per_step}
        if self.kind == "train":
            given = [k for k, v in outside.items() if v]
            if given:
                raise ValueError(f"{given} describe checkpoints made outside polca; set "
                                 "source.kind = 'hf' or 'state-dict'")
            return self
        if self.path is None:
            raise ValueError(f"source.kind = {self.kind!r} needs source.path: where the "
                             "checkpoints are")
        if self.kind == "state-dict" and self.factory is None:
            raise ValueError("source.kind = 'state-dict' needs source.factory: the "
                             '"module:function" that builds the model the state dicts fit')
        if self.kind == "hf":
            given = [k for k in ("factory", "factory_kwargs", "loss_fn") if outside[k]]
            if given:
                raise ValueError(f"{given} apply to source.kind = 'state-dict'; a Hugging Face "
                                 "series builds its model from config.json")
        elif self.revisions is not None or self.tokens_per_step is not None:
            raise ValueError("source.revisions and source.tokens_per_step describe a Hugging "
                             "Face series (kind 'hf')")
        return self


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
    start: int = Field(0, ge=0, description="first checkpoint: analyse training from this step "
                                            "on (earlier steps are trained, not stored)")

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
    min_samples: int | None = Field(None, gt=0, description="default: 0.00375 × tokens clustered")
    top_clusters: int = Field(3, gt=0)
    break_delta: int | None = Field(None, gt=0, description="Δ in steps for break times")
    flat_after: int | None = Field(None, ge=0, description="τ in steps; default: 90% of decrease")


class ReportConfig(Section):
    examples_per_cluster: int = Field(10, gt=0)
    interactive: bool | None = Field(
        None, description="an interactive trajectory view (Bokeh, inlined, offline); "
                          "default: when the [interactive] extra is installed")


class BinaryLabelConfig(Section):
    """A two-valued label of the probe tokens scored with the paper's homogeneity, recall and
    F1 (:func:`polca.evaluate.label_table`); written to ``evaluation/label-<column>.csv``."""

    column: str
    positive: str | int | bool | None = Field(
        None, description="the value that marks the skill (default: True / 1)")
    group: str | None = Field(None, description="grouping column (the paper's: place)")
    skill_groups: list[str | int] | None = Field(
        None, description="groups whose positives are the skill (default: all)")


class EvaluateConfig(Section):
    labels: list[BinaryLabelConfig] = Field(
        default_factory=list, description="binary labels to score (paper's Appendix G metric)")
    auto_binary: bool = Field(True, description="also score every other two-valued label "
                                                "column (positive: True/1, else the rarer value)")


class ComputeConfig(Section):
    """Where and in which arithmetic the analysis stages run (every stage that computes).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, …, ``"auto"`` (CUDA when available), or
    None: ``train.device`` (``"cpu"`` unless set). Training runs there too (in float32, as the
    progress measures; ``dtype`` is the analysis stages' arithmetic).
    ``dtype``: the model's forward arithmetic, overriding the per-stage defaults
    (trajectories float64, ``basis.dtype``, ``decompose.dtype``): ``float64``, ``float32``,
    ``tf32`` (float32 storage, TensorFloat-32 matrix products on CUDA) or ``bfloat16``.
    Projections (δ = ⟨b, Δθ⟩, the terms) accumulate in float64 whatever the model runs in.
    """

    device: str | None = None
    dtype: Literal["float64", "float32", "tf32", "bfloat16"] | None = None


class ExecutorConfig(Section):
    """How the decompose and trajectories stages run their blocks (:mod:`polca.parallel`);
    results are the same whichever runs them."""

    kind: Literal["in-process", "ray"] = "in-process"
    address: str | None = Field(None, description='Ray: "auto" (a running cluster), '
                                                  '"HOST:PORT", or None (a local one)')
    block_intervals: int = Field(8, gt=0, description="consecutive intervals per decompose "
                                                      "task (their shared checkpoints once)")
    hvp_shards: int = Field(1, gt=0, description="basis sample shards summed per Hessian-vector "
                                                 "product (changes rounding: an input)")


class RunConfig(Section):
    name: str
    seed: int = 0
    source: SourceConfig = SourceConfig()
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoints: CheckpointConfig = CheckpointConfig()
    trajectories: TrajectoryConfig = TrajectoryConfig()
    basis: BasisConfig = BasisConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    cluster: ClusterConfig = ClusterConfig()
    report: ReportConfig = ReportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compute: ComputeConfig = ComputeConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="after")
    def _task_fits_source(self):
        outside = self.source.kind != "train"
        if outside != (self.task.kind == "probe-file"):
            raise ValueError(
                "a run of checkpoints made outside polca (source.kind 'hf' or 'state-dict') "
                "takes its probe set from a file (task.kind = 'probe-file'), and a probe-file "
                "task needs such a source; got source.kind = "
                f"{self.source.kind!r} with task.kind = {self.task.kind!r}")
        return self

    @property
    def trains(self) -> bool:
        """Whether polca trains this run (built-in source) rather than analysing a series."""
        return self.source.kind == "train"

    @model_validator(mode="after")
    def _checkpoints_within_training(self):
        start, total = self.checkpoints.start, self.train.steps
        if start >= total:
            raise ValueError(f"checkpoints.start ({start}) must be below train.steps ({total})")
        outside = [s for s in self.checkpoints.steps or () if not start <= s <= total]
        if outside:
            raise ValueError(f"checkpoints.steps {outside} lie outside checkpoints.start.."
                             f"train.steps ({start}..{total})")
        return self


# Config sections that define a trained run: a run directory keeps them for good.
TRAINING_SECTIONS = ("seed", "source", "task", "model", "train", "checkpoints")
# Config values that change only where or how fast a run computes, not what: a change of one
# recomputes nothing (results agree to rounding; compute.dtype is an input of the stages it
# affects).
RUNTIME_KEYS = ("train.device", "compute.device", "executor.kind", "executor.address",
                "executor.block_intervals", "trajectories.batch_size", "decompose.batch_size",
                "decompose.engine")


def config_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, object, object]]:
    """Every value that differs between two configs, as ``(dotted key, old, new)`` (nested
    tables such as ``task.options`` key by key).

    >>> a = RunConfig.model_validate({"name": "x", "cluster": {"min_samples": 5}})
    >>> config_changes(a, a.model_copy(update={"seed": 1}))
    [('seed', 0, 1)]
    """
    out: list[tuple[str, object, object]] = []

    def walk(a, b, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in [*a, *(k for k in b if k not in a)]:
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        elif a != b:
            out.append((prefix, a, b))

    walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    return out


def parse_settings(items: list[str]) -> dict:
    """``["basis.every=500", "decompose.batch_size=16"]`` (values in TOML, a bare word a
    string) as nested config sections.

    >>> parse_settings(["basis.every=500", "basis.kinds=['random']", "name=x"])
    {'basis': {'every': 500, 'kinds': ['random']}, 'name': 'x'}
    """
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. basis.every=500")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word is a string
        *sections, last = key.strip().split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {section} is a value, not a section")
        node[last] = value
    return out


def merged(data: dict, overrides: dict) -> dict:
    """``data`` with ``overrides`` (nested sections) set over it, key by key.

    >>> merged({"basis": {"every": 200, "tol": 0.1}}, {"basis": {"every": 500}})
    {'basis': {'every': 500, 'tol': 0.1}}
    """
    out = dict(data)
    for key, value in overrides.items():
        out[key] = (merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read and validate a TOML run config, with ``overrides`` (nested sections, e.g. from
    :func:`parse_settings`) set over it; every problem is reported with its key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped configs are in "
                          f"{shipped_configs()} (e.g. demo-addition.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return parse_config(merged(data, overrides or {}), source=str(path))


def shipped_configs() -> Path:
    """The folder of the configs shipped inside the package (``configs/`` in the
    repository links to it)."""
    return Path(str(resources.files("polca") / "configs"))


def shipped_config(name: str) -> Path:
    """A shipped config by file name (``"demo-addition.toml"``)."""
    path = shipped_configs() / name
    if not path.is_file():
        raise ConfigError(f"no shipped config {name!r} in {shipped_configs()}; there are "
                          f"{sorted(p.name for p in shipped_configs().glob('*.toml'))}")
    return path


def parse_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            if e["type"] == "extra_forbidden":
                lines.append(f"{key}: unknown key; remove it or fix its spelling")
            else:
                lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


# what a run of checkpoints made outside polca does not use: the sections that describe
# training by polca (of `train`, only the device the analysis runs on), and the built-in
# tasks' sizes
UNUSED_OUTSIDE = {"model": None, "checkpoints": None, "train": ("device",),
                  "task": ("kind", "options")}


def dump_config(cfg: RunConfig, used_only: bool = False) -> str:
    """The resolved config as TOML (written to runs/NAME/config.toml); ``used_only`` leaves
    out what a run of outside checkpoints does not use (:data:`UNUSED_OUTSIDE`).

    >>> cfg = RunConfig.model_validate({"name": "x", "source": {"kind": "hf", "path": "p"},
    ...                                 "task": {"kind": "probe-file"}})
    >>> "d_model" in dump_config(cfg), "d_model" in dump_config(cfg, used_only=True)
    (True, False)
    """
    data = cfg.model_dump(mode="json", exclude_none=True)
    if used_only and not cfg.trains:
        for section, kept in UNUSED_OUTSIDE.items():
            if kept is None:
                data.pop(section, None)
            else:
                data[section] = {k: v for k, v in data[section].items() if k in kept}
    return _to_toml(data)


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
