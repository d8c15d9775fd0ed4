"""Run an experiment: a tracked training run, or a study of them when `sweep.n_trials > 0`."""

from __future__ import annotations

import math
import shlex
import sys
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from research import distributed, registry
from research.config import Config, resolve_path
from research.trainer import Hooks, TrainResult, train
from research.tracking import MLflowHook, mlflow_run, tracking_uri


def run_experiment(cfg: DictConfig):
    """What `python run.py exp=NAME ...` does once the config is built."""
    module = registry.load(cfg.exp)
    if hasattr(module, "main"):
        return module.main(cfg)
    if cfg.sweep.n_trials > 0:
        from research.sweep import run_sweep

        return run_sweep(cfg)
    result = run_tracked(cfg)
    if distributed.launched_rank() == 0:  # under torchrun, one report
        report(cfg, result)
    return result


def run_tracked(
    cfg: DictConfig, hooks: Sequence[Hooks] = (), parent_run_id: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None,
) -> TrainResult:
    """One training run, logged to MLflow by rank 0 (other ranks only train); `run_id` continues a logged run."""
    if not cfg.tracking.enabled or distributed.launched_rank() != 0:
        return train(cfg, hooks)
    with mlflow_run(cfg, parent_run_id=parent_run_id, tags=tags, run_id=run_id) as (client, run_id):
        if not cfg.train.checkpoint_dir:
            cfg.train.checkpoint_dir = str(resolve_path(cfg.out_dir) / "checkpoints" / run_id)
        print_run_header(cfg, run_id)
        hook = MLflowHook(client, run_id)
        try:
            result = train(cfg, [hook, *hooks])
        except KeyboardInterrupt:
            hook.close()
            print(f"continue this run with: {resume_command(cfg, run_id)}", file=sys.stderr, flush=True)
            raise
        except BaseException:
            hook.close()  # the metrics up to the failure are kept
            raise
        result.run_id = run_id
    return result


def resume_command(cfg: DictConfig, run_id: str) -> str:
    """The command line that continues a run, naming its store when that is not the default one."""
    args = [f"resume={run_id}"]
    defaults = OmegaConf.structured(Config)
    for key in ("out_dir", "tracking.uri"):
        if OmegaConf.select(cfg, key) != OmegaConf.select(defaults, key):
            args.append(f"{key}={OmegaConf.select(cfg, key)}")
    return "python run.py " + " ".join(shlex.quote(arg) for arg in args)


def print_run_header(cfg: DictConfig, run_id: str) -> None:
    Console().print(f"[bold]{cfg.exp}[/] run [cyan]{run_id}[/] -> {tracking_uri(cfg)}")


def report(cfg: DictConfig, result: TrainResult) -> None:
    """Where to look once a run is done."""
    console = Console()
    console.print(f"\n[bold]done[/] in {result.wall_time_s:.0f}s: {result.steps} steps, {result.tokens_seen:,} tokens, final val loss [bold]{result.final_val_loss:.3f}[/]"
                  + (f", test loss [bold]{result.final_test_loss:.3f}[/]" if math.isfinite(result.final_test_loss) else ""))
    for prompt, text in result.samples[:2]:
        console.print(f"[dim]sample:[/] {text[:300]!r}")
    run_id = getattr(result, "run_id", None)
    if run_id:
        console.print(f"run id {run_id}; browse with [bold]python run.py ui[/] (store: {tracking_uri(cfg)})")
    if result.checkpoint:
        console.print(f"checkpoint: {result.checkpoint}")
