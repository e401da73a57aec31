"""The `polca` command line: run every stage of a config, or one stage of a run.

    polca run configs/demo-addition.toml     # every stage in order, skipping what is done
    polca train runs/demo-addition            # one stage (a run directory or a config file)
    polca demo                                # the shipped demo into runs/demo-addition
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polca.checkpoints import CheckpointError
from polca.config import ConfigError, load_config
from polca.store import StoreError

app = typer.Typer(
    help="Find hidden breakthroughs in training runs (POLCA).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = ("train", "trajectories", "basis", "decompose", "cluster", "evaluate", "report")

Target = Annotated[Path, typer.Argument(help="a run directory, or a config TOML (run goes to "
                                             "RUNS/<name>)")]
RunsDir = Annotated[Path, typer.Option("--runs", help="where config runs are created")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def _open(target: Path, runs: Path):
    from polca.stages.common import open_run

    if target.suffix == ".toml":
        cfg = load_config(target)
        return open_run(runs / cfg.name, cfg)
    if not (target / "config.toml").is_file():
        raise ConfigError(f"{target} is neither a config .toml file nor a run directory with a "
                          "config.toml; pass e.g. configs/demo-addition.toml")
    return open_run(target)


def _stage(name: str):
    import importlib

    module = importlib.import_module(f"polca.stages.{name}")
    return getattr(module, f"run_{name}")


def _run_stages(target: Path, runs: Path, stages, quiet: bool) -> None:
    try:
        ctx = _open(target, runs)
        for name in stages:
            typer.secho(f"── {name}", fg=typer.colors.CYAN, err=True)
            result = _stage(name)(ctx, progress=not quiet)
            if name == "evaluate" and result is not None:
                from polca.stages.evaluate import format_tables

                typer.echo(format_tables(result))
            if name == "report" and result is not None:
                typer.secho(f"report: {result}", fg=typer.colors.GREEN)
        typer.secho(f"run: {ctx.run.root}", fg=typer.colors.GREEN)
    except (ConfigError, StoreError, CheckpointError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def run(target: Target, runs: RunsDir = Path("runs"), quiet: Quiet = False) -> None:
    """Run every stage in order; stages (and blocks within them) already done are skipped."""
    _run_stages(target, runs, STAGES, quiet)


def _single(name: str):
    def command(target: Target, runs: RunsDir = Path("runs"), quiet: Quiet = False) -> None:
        _run_stages(target, runs, [name], quiet)

    command.__doc__ = f"Run the `{name}` stage only."
    return command


for _name in (*STAGES, "measures"):
    app.command(name=_name)(_single(_name))


class Demo(str, Enum):
    addition = "addition"
    text = "text"


@app.command()
def demo(which: Annotated[Demo, typer.Argument()] = Demo.addition,
         runs: RunsDir = Path("runs"), quiet: Quiet = False) -> None:
    """Run a shipped demo (configs/demo-<which>.toml) into RUNS/demo-<which>."""
    _run_stages(CONFIGS / f"demo-{which.value}.toml", runs, STAGES, quiet)


if __name__ == "__main__":
    app()
