"""The `polca` command line: run every stage of a config, or one stage of a run.

    polca run configs/demo-addition.toml     # every stage in order, skipping what is done
    polca train runs/demo-addition            # one stage (a run directory or a config file)
    polca demo                                # the shipped demo into runs/demo-addition
    polca analyze --hf ckpts/checkpoint-* --probe probe.jsonl --name mine   # your own run

Every command that runs stages prints one line per stage (its time, or "done (skipped)"),
ends with what the run found in plain sentences and the report's path, and stops on bad
input with one ``error:`` line (exit 2). Ctrl-C or SIGTERM stop it with a line that says how
far it got (exit 130 or 143); the same command resumes.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. With spinning, two torch
# threads next to any other busy process on a 2-core machine ran polca's small models 20x
# slower (2.9 against 49 steps/s measured; 61 with one thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import functools
import signal
import textwrap
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polca import progress as P
from polca.bases import BasisError
from polca.byo import CheckpointSeriesError
from polca.checkpoints import CheckpointError
from polca.config import ConfigError, load_config, parse_settings, shipped_config
from polca.corpus import CorpusError
from polca.probes import ProbeFileError
from polca.stages import STAGES
from polca.store import StoreError

# user errors: stop with the message (it names the problem and the fix), no traceback
# (NotImplementedError: a Hugging Face architecture polca cannot differentiate exactly)
ERRORS = (ConfigError, StoreError, CheckpointError, CheckpointSeriesError, ProbeFileError,
          CorpusError, BasisError, NotImplementedError, FileNotFoundError)
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number

app = typer.Typer(
    help="Find hidden breakthroughs in training runs (POLCA).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)

Target = Annotated[Path, typer.Argument(help="a run directory, or a config TOML (run goes to "
                                             "RUNS/<name>)")]
RunsDir = Annotated[Path, typer.Option("--runs", help="where config runs are created")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or stage lines")]
Settings = Annotated[list[str], typer.Option(
    "--set", help="any config value, SECTION.KEY=VALUE (repeatable), e.g. cluster.min_samples=5")]
# where and how a command computes (config sections compute and executor)
Device = Annotated[str | None, typer.Option(
    help="where to compute: cpu, cuda, cuda:1, auto (default: the config's compute.device)")]
Dtype = Annotated[str | None, typer.Option(
    help="the model's arithmetic: float64, float32, tf32, bfloat16 (projections accumulate "
         "in float64; default: each stage's own, float64 on the CPU)")]
ExecutorKind = Annotated[str | None, typer.Option(
    "--executor", help="in-process (default) or ray: blocks of intervals and checkpoints as Ray "
                       "tasks, basis sample shards as Ray actors (pip install "
                       "'polca-breakthroughs\\[ray]')")]
Address = Annotated[str | None, typer.Option(
    help="the Ray cluster: auto (started with `ray start --head`) or HOST:PORT (default: a "
         "local one)")]


def _show_version(value: bool) -> None:
    if value:
        from polca import __version__

        typer.echo(f"polca {__version__}")
        raise typer.Exit()


@app.callback()
def main(_version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True,
        help="print the version and exit")] = False) -> None:
    """Find hidden breakthroughs in training runs (POLCA)."""


# -- errors and signals ---------------------------------------------------------------------------
class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signum, where)
        self.signum, self.where = signum, where


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def command(function):
    """A CLI command that ends every way with one line: an ``error:`` (exit 2, no traceback;
    ``POLCA_TRACEBACK=1`` shows it for an unexpected one) or a resumable interruption."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        handlers = ({s: signal.signal(s, _raise_interrupted) for s in SIGNAL_EXIT}
                    if threading.current_thread() is threading.main_thread() else {})
        try:
            return function(*args, **kwargs)
        except (Interrupted, KeyboardInterrupt) as err:
            signum = getattr(err, "signum", signal.SIGINT)
            where = getattr(err, "where", "")
            typer.secho(f"interrupted{f' ({where})' if where else ''} — run the same command "
                        "to resume", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(SIGNAL_EXIT[signum]) from None
        except ERRORS as err:
            raise _fail(str(err)) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:
            if os.environ.get("POLCA_TRACEBACK"):
                raise
            raise _fail(f"unexpected {type(err).__name__}: {err} (rerun with POLCA_TRACEBACK=1 "
                        "to see where; if it is a bug, please report it)") from None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    return wrapper


def _fail(message: str) -> typer.Exit:
    """One ``error:`` line (a message of several lines is joined), exit status 2."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    typer.secho(f"error: {'; '.join(lines)}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


# -- opening and running --------------------------------------------------------------------------
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


def _overrides(settings: list[str], compute: dict | None = None) -> dict:
    """``--set`` values with the compute options (which win) merged over them."""
    from polca.config import merged

    return merged(parse_settings(settings), compute or {})


def _open(target: Path, runs: Path, overrides: dict):
    from polca.config import merged, parse_config
    from polca.stages.common import open_run
    from polca.store import RunDir

    if target.suffix == ".toml":
        cfg = load_config(target, overrides)
        return open_run(runs / cfg.name, cfg)
    run = RunDir(target)
    if not run.exists():
        raise ConfigError(f"{target} is neither a config .toml file nor a run directory with a "
                          "config.toml; pass e.g. configs/demo-addition.toml")
    if not overrides:
        return open_run(target)
    stored = load_config(run.config_path)
    return open_run(target, parse_config(
        merged(stored.model_dump(mode="json", exclude_none=True), overrides),
        source=f"{run.config_path} with --set"))


def _execute(ctx, stages, quiet: bool, outer: P.Bar | None = None) -> None:
    """Run ``stages`` in order, one line each (its time, or "done (skipped)"), then (after the
    stages that make them: evaluate, report) what the run found and where its report is.
    ``outer``: a bar over a longer job, moved on by one per stage."""
    from polca.api import run_stage

    with ctx.run.lock():  # the whole command: no other process between two stages
        for name in stages:
            if outer is not None:
                outer.set_postfix(run=ctx.run.root.name, stage=name)
            started = time.monotonic()
            with P.journal() as log:
                try:
                    run_stage(ctx, name, progress=not quiet)
                except (Interrupted, KeyboardInterrupt) as err:
                    position = log.position()
                    where = f"during {name}" + (f", {position} on disk" if position else "")
                    raise Interrupted(getattr(err, "signum", signal.SIGINT), where) from None
            if not quiet:
                state = ("done (skipped)" if log.skipped
                         else f"done in {P.duration(time.monotonic() - started)}")
                typer.secho(f"{name}: {state}", fg=typer.colors.CYAN, err=True)
            if outer is not None:
                outer.update()
    if {"evaluate", "report"} & set(stages):
        _conclude(ctx.run)


def _conclude(run) -> None:
    """What the run found, in plain sentences, and where the report is."""
    from polca.findings import to_text
    from polca.report.reproduction import BEYOND_THE_DEMO
    from polca.report.summary import identity_line, read_findings, run_identity

    typer.echo("")
    typer.echo(identity_line(run_identity(run)))
    typer.echo(to_text(read_findings(run), brief=True), nl=False)
    summary = run.read_summary()
    if summary is not None and summary.get("reproduction") is not None:  # an addition run
        typer.echo(textwrap.fill(BEYOND_THE_DEMO, 100))
    if run.report_path().is_file():
        typer.secho(f"report: {run.report_path()}", fg=typer.colors.GREEN)
    else:
        typer.secho(f"run: {run.root} (no report yet: run `polca report {run.root}`)",
                    fg=typer.colors.GREEN)


def _run_stages(target: Path, runs: Path, stages, quiet: bool, settings: list[str],
                compute: dict | None = None) -> None:
    from polca.api import stages_of

    ctx = _open(target, runs, _overrides(settings, compute))
    _execute(ctx, [s for s in stages if s in stages_of(ctx.cfg)] or stages, quiet)


@app.command()
@command
def run(target: Target, runs: RunsDir = Path("runs"), settings: Settings = [],  # noqa: B006
        quiet: Quiet = False, device: Device = None, dtype: Dtype = None,
        executor: ExecutorKind = None, address: Address = None) -> None:
    """Run every stage in order; stages (and blocks within them) already done are skipped."""
    _run_stages(target, runs, STAGES, quiet, settings, _compute(device, dtype, executor, address))


# the stages that evaluate the model (the others read arrays)
COMPUTING = ("train", "trajectories", "basis", "decompose", "measures")


def _single(name: str):
    if name in COMPUTING:
        def single(target: Target, runs: RunsDir = Path("runs"),
                   settings: Settings = [],  # noqa: B006
                   quiet: Quiet = False, device: Device = None, dtype: Dtype = None,
                   executor: ExecutorKind = None, address: Address = None) -> None:
            _run_stages(target, runs, [name], quiet, settings,
                        _compute(device, dtype, executor, address))
    else:
        def single(target: Target, runs: RunsDir = Path("runs"),
                   settings: Settings = [],  # noqa: B006
                   quiet: Quiet = False) -> None:
            _run_stages(target, runs, [name], quiet, settings)

    single.__doc__ = f"Run the `{name}` stage only."
    return command(single)


for _name in STAGES:
    app.command(name=_name)(_single(_name))


class Demo(str, Enum):
    addition = "addition"
    text = "text"


@app.command()
@command
def demo(which: Annotated[Demo, typer.Argument()] = Demo.addition,
         runs: RunsDir = Path("runs"), settings: Settings = [],  # noqa: B006
         quiet: Quiet = False, device: Device = None, dtype: Dtype = None) -> None:
    """Run a shipped demo (the package's configs/demo-<which>.toml) into RUNS/demo-<which>."""
    _run_stages(shipped_config(f"demo-{which.value}.toml"), runs, STAGES, quiet, settings,
                _compute(device, dtype))


@app.command()
@command
def reproduce(target: Annotated[Path | None, typer.Argument(
                  help="an addition config or run (default: the shipped demo-addition.toml)")
              ] = None,
              out: Annotated[Path, typer.Option(help="markdown file to write")] = Path(
                  "docs/reproduction.md"),
              seeds: Annotated[str | None, typer.Option(
                  help="comma-separated seeds, e.g. 0,1,2: one run per seed (RUNS/<name>-s<seed>)"
                       ", then every row as mean ± sd over them, between OUT's seeds-table "
                       "markers")] = None,
              runs: RunsDir = Path("runs"), settings: Settings = [],  # noqa: B006
              quiet: Quiet = False, device: Device = None, dtype: Dtype = None,
              executor: ExecutorKind = None, address: Address = None) -> None:
    """Run every stage of an addition config, then write its reproduction table (ours beside
    the paper's numbers, and the report's sentences) as markdown into OUT, between the table
    markers; with --seeds, run each seed and write the table over seeds."""
    from polca.report import docs
    from polca.store import RunDir

    shown = target or Path("configs/demo-addition.toml")
    target = target or shipped_config("demo-addition.toml")
    if seeds is not None:
        _reproduce_seeds(target, shown, out, _csv(seeds, _seed), runs, settings, quiet,
                         _compute(device, dtype, executor, address))
        return
    _run_stages(target, runs, STAGES, quiet, settings, _compute(device, dtype, executor, address))
    root = target if target.suffix != ".toml" else runs / load_config(
        target, parse_settings(settings)).name
    summary = RunDir(root).read_summary()
    if summary is None or summary.get("reproduction") is None:
        raise ConfigError(f"{root} has no reproduction table: it is made for the addition "
                          "task (evaluation/carry.csv)")
    block = docs.table_block(summary, command=f"polca reproduce {shown} --out {out}")
    docs.write_between(out, docs.TABLE_BEGIN, docs.TABLE_END, block)  # keeps the prose around
    typer.secho(f"table: {out}", fg=typer.colors.GREEN)


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is not a whole number; pass e.g. --seeds 0,1,2"
                          ) from None


def _reproduce_seeds(target: Path, shown: Path, out: Path, seeds: list[int], runs: Path,
                     settings: list[str], quiet: bool, compute: dict) -> None:
    """``polca reproduce --seeds``: every stage of ``target`` once per seed (run
    ``<name>-s<seed>``, resumable like any run), then the table over seeds into ``out``."""
    import torch

    from polca.api import stages_of
    from polca.config import merged
    from polca.report import docs
    from polca.report import seeds as S

    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs distinct seeds, e.g. --seeds 0,1,2 (got {seeds})")
    if target.suffix != ".toml":
        raise ConfigError(f"--seeds runs a config once per seed: pass a config .toml, not the "
                          f"run directory {target}")
    base = load_config(target, _overrides(settings, compute))
    stages = [s for s in STAGES if s in stages_of(base)] or list(STAGES)
    started, roots = time.monotonic(), []
    outer = P.bar(not quiet, len(seeds) * len(stages), 0, "reproduce", "stage")
    try:
        for seed in seeds:
            overrides = merged(_overrides(settings, compute),
                               {"seed": seed, "name": f"{base.name}-s{seed}"})
            ctx = _open(target, runs, overrides)
            _execute(ctx, stages, quiet, outer)
            roots.append(ctx.run.root)
    finally:
        outer.close()
    wall = time.monotonic() - started
    recorded, loads = S.wall_seconds(roots)
    note = (f"The {len(seeds)} runs' stages took {P.duration(recorded)} as recorded in their "
            f"run directories (torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
            + (f", 1-minute load {min(loads):.1f}–{max(loads):.1f}" if loads else "")
            + f"); the last `polca reproduce` call took {P.duration(wall)} wall clock.")
    command = f"polca reproduce {shown} --seeds {','.join(map(str, seeds))} --out {out}"
    block = S.seed_table(roots, seeds, command, note)
    docs.write_between(out, S.SEEDS_BEGIN, S.SEEDS_END, block)  # keeps the prose around it
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


@app.command()
@command
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
    settings: Settings = [],  # noqa: B006 - typer needs a literal default
    quiet: Quiet = False,
) -> None:
    """Analyse a run trained elsewhere: trajectories, basis, decomposition, clustering,
    evaluation and the report into RUNS/NAME. Nothing is written if the checkpoints or the probe
    file cannot be used."""
    from polca.api import ANALYSIS_STAGES, Run

    if (hf is None) == (checkpoints is None):
        raise ConfigError("give exactly one of --hf (Hugging Face checkpoints) or "
                          "--checkpoints (state-dict files, with --factory)")
    config = _overrides(settings, _compute(device, dtype, executor, address))
    config.setdefault("basis", {}).setdefault("kinds", _csv(basis))
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
                f"{ctx.probe.n_tokens} probe tokens{cut}, d = {ctx.loss.space.dim}", err=True)
    _execute(ctx, ANALYSIS_STAGES, quiet)


if __name__ == "__main__":
    app()
