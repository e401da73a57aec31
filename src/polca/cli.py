"""The `polca` command line: run every stage of a config, or one stage of a run.

    polca run configs/demo-addition.toml     # every stage in order, skipping what is done
    polca train runs/demo-addition            # one stage (a run directory or a config file)
    polca demo                                # the shipped demo into runs/demo-addition
    polca analyze --hf ckpts/checkpoint-* --probe probe.jsonl --name mine   # your own run
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. With spinning, two torch
# threads next to any other busy process on a 2-core machine ran polca's small models 20x
# slower (2.9 against 49 steps/s measured; 61 with one thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polca.api import ANALYSIS_STAGES, STAGES
from polca.byo import CheckpointSeriesError
from polca.checkpoints import CheckpointError
from polca.config import ConfigError, load_config
from polca.probes import ProbeFileError
from polca.store import StoreError

# user errors: stop with the message (it names the problem and the fix), no traceback
# (NotImplementedError: a Hugging Face architecture polca cannot differentiate exactly)
ERRORS = (ConfigError, StoreError, CheckpointError, CheckpointSeriesError, ProbeFileError,
          NotImplementedError)

app = typer.Typer(
    help="Find hidden breakthroughs in training runs (POLCA).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

Target = Annotated[Path, typer.Argument(help="a run directory, or a config TOML (run goes to "
                                             "RUNS/<name>)")]
RunsDir = Annotated[Path, typer.Option("--runs", help="where config runs are created")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
# where and how a command computes (config sections compute and executor)
Device = Annotated[str | None, typer.Option(
    help="where to compute: cpu, cuda, cuda:1, auto (default: the config's compute.device)")]
Dtype = Annotated[str | None, typer.Option(
    help="the model's arithmetic: float64, float32, tf32, bfloat16 (projections accumulate "
         "in float64; default: each stage's own, float64 on the CPU)")]
ExecutorKind = Annotated[str | None, typer.Option(
    "--executor", help="in-process (default) or ray: blocks of intervals and checkpoints as Ray "
                       "tasks, basis sample shards as Ray actors (pip install 'polca[ray]')")]
Address = Annotated[str | None, typer.Option(
    help="the Ray cluster: auto (started with `ray start --head`) or HOST:PORT (default: a "
         "local one)")]


def _compute(device=None, dtype=None, executor=None, address=None) -> dict:
    """Config sections of the compute options given on the command line."""
    out: dict = {}
    if device is not None or dtype is not None:
        out["compute"] = {k: v for k, v in (("device", device), ("dtype", dtype)) if v}
    if executor is not None or address is not None:
        out["executor"] = {k: v for k, v in (("kind", executor), ("address", address)) if v}
        if address is not None and executor is None:
            out["executor"]["kind"] = "ray"
    return out


def _with(cfg, overrides: dict):
    """``cfg`` with the sections of ``overrides`` merged in, validated again."""
    if not overrides:
        return cfg
    from polca.config import parse_config

    data = cfg.model_dump(mode="json", exclude_none=True)
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_config(data, source="the command line")


def _open(target: Path, runs: Path, overrides: dict | None = None):
    from polca.stages.common import open_run
    from polca.store import RunDir

    if target.suffix == ".toml":
        cfg = _with(load_config(target), overrides)
        return open_run(runs / cfg.name, cfg)
    if not RunDir(target).exists():
        raise ConfigError(f"{target} is neither a config .toml file nor a run directory with a "
                          "config.toml; pass e.g. configs/demo-addition.toml")
    if overrides:
        return open_run(target, _with(load_config(RunDir(target).config_path), overrides))
    return open_run(target)


def _execute(ctx, stages, quiet: bool) -> None:
    from polca.api import run_stage
    from polca.stages.evaluate import format_tables

    report = None
    with ctx.run.lock():  # the whole command: no other process between two stages
        for name in stages:
            typer.secho(f"── {name}", fg=typer.colors.CYAN, err=True)
            result = run_stage(ctx, name, progress=not quiet)
            if name == "evaluate" and result is not None and len(stages) == 1:
                typer.echo(format_tables(result))
            if name == "report":
                report = result
    if "evaluate" in stages and len(stages) > 1:
        typer.echo(_summary(ctx.run))
    if report is not None:
        typer.secho(f"report: {report}", fg=typer.colors.GREEN)
    typer.secho(f"run: {ctx.run.root}", fg=typer.colors.GREEN)


def _summary(run) -> str:
    """The reproduction table where the run has the paper's carry labels, else the
    hidden-breakthrough table (the full tables are in the run's evaluation/ folder)."""
    from polca.evaluate import format_table
    from polca.report.reproduction import reproduction_markdown

    if run.read_evaluation_table("carry") is not None:
        return reproduction_markdown(run)
    hidden = run.read_evaluation_table("hidden")
    if hidden is None:
        return "No clusters were found (see the report's cluster section)."
    return format_table(hidden.drop(columns=["paper"], errors="ignore"),
                        "Hidden breakthroughs (cluster mean break step > tau)")


def _fail(err: Exception):
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _run_stages(target: Path, runs: Path, stages, quiet: bool,
                overrides: dict | None = None) -> None:
    from polca.api import stages_of

    try:
        ctx = _open(target, runs, overrides)
        _execute(ctx, [s for s in stages if s in stages_of(ctx.cfg)] or stages, quiet)
    except ERRORS as err:
        raise _fail(err) from None


@app.command()
def run(target: Target, runs: RunsDir = Path("runs"), quiet: Quiet = False,
        device: Device = None, dtype: Dtype = None, executor: ExecutorKind = None,
        address: Address = None) -> None:
    """Run every stage in order; stages (and blocks within them) already done are skipped."""
    _run_stages(target, runs, STAGES, quiet, _compute(device, dtype, executor, address))


# the stages that evaluate the model (the others read arrays)
COMPUTING = ("train", "trajectories", "basis", "decompose", "measures")


def _single(name: str):
    if name in COMPUTING:
        def command(target: Target, runs: RunsDir = Path("runs"), quiet: Quiet = False,
                    device: Device = None, dtype: Dtype = None, executor: ExecutorKind = None,
                    address: Address = None) -> None:
            _run_stages(target, runs, [name], quiet, _compute(device, dtype, executor, address))
    else:
        def command(target: Target, runs: RunsDir = Path("runs"), quiet: Quiet = False) -> None:
            _run_stages(target, runs, [name], quiet)

    command.__doc__ = f"Run the `{name}` stage only."
    return command


for _name in STAGES:
    app.command(name=_name)(_single(_name))


class Demo(str, Enum):
    addition = "addition"
    text = "text"


@app.command()
def demo(which: Annotated[Demo, typer.Argument()] = Demo.addition,
         runs: RunsDir = Path("runs"), quiet: Quiet = False, device: Device = None,
         dtype: Dtype = None) -> None:
    """Run a shipped demo (configs/demo-<which>.toml) into RUNS/demo-<which>."""
    _run_stages(CONFIGS / f"demo-{which.value}.toml", runs, STAGES, quiet,
                _compute(device, dtype))


BEGIN, END = "<!-- reproduction table: begin -->", "<!-- reproduction table: end -->"


@app.command()
def reproduce(target: Target = CONFIGS / "demo-addition.toml",
              out: Annotated[Path, typer.Option(help="markdown file to write")] = Path(
                  "docs/reproduction.md"),
              runs: RunsDir = Path("runs"), quiet: Quiet = False, device: Device = None,
              dtype: Dtype = None, executor: ExecutorKind = None,
              address: Address = None) -> None:
    """Run every stage of an addition config, then write its reproduction table (ours beside
    the paper's numbers) as markdown."""
    from polca.report.reproduction import reproduction_markdown

    _run_stages(target, runs, STAGES, quiet, _compute(device, dtype, executor, address))
    root = target if target.suffix != ".toml" else runs / load_config(target).name
    command = f"polca reproduce {target} --out {out}"
    table = f"{BEGIN}\n{reproduction_markdown(root, command=command)}{END}"
    text = out.read_text() if out.is_file() else ""
    if BEGIN in text and END in text:  # keep the prose around the table
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = table + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.secho(f"table: {out}", fg=typer.colors.GREEN)


def _label(item: str, group: str | None) -> dict:
    """``--label role=copy`` as an ``evaluate.labels`` entry (the value read as TOML, so
    ``true`` and ``1`` are a boolean and an integer, a bare word a string)."""
    import tomllib

    column, sep, text = item.partition("=")
    entry = {"column": column.strip()}
    if sep:
        try:
            entry["positive"] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            entry["positive"] = text
    if group is not None:
        entry["group"] = group
    return entry


def _csv(text: str | None, kind=str) -> list | None:
    return None if text is None else [kind(v.strip()) for v in text.split(",") if v.strip()]


def _settings(items: list[str]) -> dict:
    """``["basis.every=500", "decompose.batch_size=16"]`` as nested config sections."""
    import tomllib

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
        node[last] = value
    return out


@app.command()
def analyze(
    probe: Annotated[Path, typer.Option(help="probe file: .txt, .jsonl or .parquet (see "
                                             "docs/own-run.md)")],
    hf: Annotated[str | None, typer.Option(
        help="Hugging Face checkpoints: a glob of save_pretrained folders, their parent folder, "
             "a hub cache models--org--name, or a series manifest .json")] = None,
    revisions: Annotated[str | None, typer.Option(help="hub cache refs, comma-separated "
                                                       "(default: every step* ref)")] = None,
    tokens_per_step: Annotated[int | None, typer.Option(
        help="training tokens per step of an --hf series: results get a tokens-seen axis "
             "(default: Pythia's 1024 x 2048 for EleutherAI/pythia-* hub caches)")] = None,
    checkpoints: Annotated[str | None, typer.Option(
        help="state-dict files of any PyTorch model (.safetensors or weights-only .pt): a "
             "glob or a folder; needs --factory")] = None,
    factory: Annotated[str | None, typer.Option(
        help='"module:function" or "path/file.py:function" returning the nn.Module')] = None,
    loss_fn: Annotated[str | None, typer.Option(
        "--loss-fn", help='"module:function" (logits, ProbeBatch) -> [tokens]; default '
                          "next-token cross-entropy")] = None,
    steps: Annotated[str | None, typer.Option(help="training steps of the checkpoints in "
                                                   "order, comma-separated (default: from "
                                                   "the files)")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json (default: the HF "
                                                        "checkpoint's)")] = None,
    context_length: Annotated[int | None, typer.Option(help="tokens kept per probe example")] = None,
    truncate: Annotated[bool, typer.Option(
        help="cut probe examples longer than the context (the dropped scored tokens are "
             "counted and reported) instead of stopping")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="scored probe tokens at most")] = None,
    basis_sample: Annotated[Path | None, typer.Option(
        help="training sequences for the Hessian (probe formats; default: the probe set)")] = None,
    basis: Annotated[str, typer.Option(help="bases, comma-separated: hessian, random, "
                                            "shuffled-hessian, trajectory-pca")] = "hessian",
    include: Annotated[str | None, typer.Option(help="parameter globs forming θ, "
                                                     "comma-separated (default: all)")] = None,
    label: Annotated[list[str], typer.Option(
        help="a binary label column of the probe to score with homogeneity, recall and F1, "
             "COLUMN or COLUMN=POSITIVE (repeatable); every other two-valued label is scored "
             "too")] = [],  # noqa: B006 - typer needs a literal default
    group: Annotated[str | None, typer.Option(
        help="grouping column for --label (the paper's: place)")] = None,
    name: Annotated[str | None, typer.Option(help="run name (default: the checkpoint "
                                                  "folder's)")] = None,
    runs: RunsDir = Path("runs"),
    device: Device = None,
    dtype: Dtype = None,
    executor: ExecutorKind = None,
    address: Address = None,
    settings: Annotated[list[str], typer.Option(
        "--set", help="any config value, SECTION.KEY=VALUE (repeatable), e.g. basis.every=500")
    ] = [],  # noqa: B006 - typer needs a literal default
    quiet: Quiet = False,
) -> None:
    """Analyse a run trained elsewhere: trajectories, basis, decomposition, clustering,
    evaluation and the report into RUNS/NAME. Nothing is written if the checkpoints or the probe
    file cannot be used."""
    from polca.api import Run

    try:
        if (hf is None) == (checkpoints is None):
            raise ConfigError("give exactly one of --hf (Hugging Face checkpoints) or "
                              "--checkpoints (state-dict files, with --factory)")
        config = _settings(settings)
        config.setdefault("basis", {}).setdefault("kinds", _csv(basis))
        for section, values in _compute(device, dtype, executor, address).items():
            config[section] = {**config.get(section, {}), **values}
        if label:
            config.setdefault("evaluate", {})["labels"] = [_label(item, group) for item in label]
        elif group is not None:
            raise ConfigError("--group groups the positives of a --label; name the label too")
        common = {"name": name, "runs": runs, "steps": _csv(steps, int), "tokenizer": tokenizer,
                  "config": config, "device": device, "context_length": context_length,
                  "max_tokens": max_tokens, "basis_sample": basis_sample,
                  "include": _csv(include), "truncate": truncate}
        if hf is not None:
            if factory or loss_fn:
                raise ConfigError("--factory and --loss-fn apply to --checkpoints; a Hugging "
                                  "Face series builds its model from config.json")
            opened = Run.from_hf(hf, probe, revisions=_csv(revisions),
                                 tokens_per_step=tokens_per_step, **common)
        else:
            if factory is None:
                raise ConfigError('--checkpoints needs --factory "module:function" that builds '
                                  "the model the state dicts belong to")
            if tokens_per_step is not None:
                raise ConfigError("--tokens-per-step describes an --hf series")
            opened = Run.from_module(factory, checkpoints, probe, loss_fn, **common)
        ctx = opened.ctx
        dropped = getattr(ctx.task, "truncated_tokens", 0)
        cut = f" ({dropped} scored tokens beyond the context dropped)" if dropped else ""
        typer.secho(f"{ctx.run.root}: {len(ctx.checkpoints.steps)} checkpoints, "
                    f"{ctx.probe.n_tokens} probe tokens{cut}, d = {ctx.loss.space.dim}",
                    err=True)
        _execute(ctx, ANALYSIS_STAGES, quiet)
    except ERRORS as err:
        raise _fail(err) from None


if __name__ == "__main__":
    app()
