"""Run an experiment: a tracked training run, or a study of them when `sweep.n_trials > 0`."""

from __future__ import annotations

import math
import shlex
import sys
from typing import Sequence

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from research import distributed, registry
from research.config import Config, resolve_path
from research.names import TEST_BPB, VAL_BPB
from research.run_params import STORE_KEYS
from research.store_url import parse
from research.trainer import Hooks, TrainResult, train
from research.tracking import MLflowHook, mlflow_run
from research.tracking_store import tracking_uri
from research.ui import run_url


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
        page = run_page(tracking_uri(cfg), client, run_id)
        print_run_header(cfg, run_id, page)
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
        result.run_id, result.run_page = run_id, page
    return result


def resume_command(cfg: DictConfig, run_id: str) -> str:
    """The command line that continues a run, naming its store when that is not the default one."""
    args = [f"resume={run_id}"]
    defaults = OmegaConf.structured(Config)
    for key in STORE_KEYS:
        if OmegaConf.select(cfg, key) != OmegaConf.select(defaults, key):
            args.append(f"{key}={OmegaConf.select(cfg, key)}")
    return "python run.py " + " ".join(shlex.quote(arg) for arg in args)


def run_page(uri: str, client: MlflowClient, run_id: str) -> str:
    """The run's page in the UI of a tracking server, on the classic run view; "" for a store that has no UI of its own."""
    store = parse(uri)
    return run_url(store.url, client.get_run(run_id).info.experiment_id, run_id) if store.kind == "http" else ""


def print_run_header(cfg: DictConfig, run_id: str, page: str) -> None:
    """The run's id, and its page on a tracking server (MLflow's own "View run" link, to another view, is turned off in run.py)."""
    Console().print(f"[bold]{cfg.exp}[/] run [cyan]{run_id}[/] -> {page or parse(tracking_uri(cfg)).masked}", soft_wrap=True)


def report(cfg: DictConfig, result: TrainResult) -> None:
    """Where to look once a run is done."""
    console = Console()
    final = result.final_metrics
    console.print(f"\n[bold]done[/] in {result.wall_time_s:.0f}s: {result.steps} steps, {result.tokens_seen:,} tokens, final val loss [bold]{result.final_val_loss:.3f}[/]"
                  + (f" ({final[VAL_BPB]:.4f} bits per byte)" if math.isfinite(final.get(VAL_BPB, math.nan)) else "")
                  + (f", test loss [bold]{result.final_test_loss:.3f}[/]" if math.isfinite(result.final_test_loss) else "")
                  + (f" ({final[TEST_BPB]:.4f} bits per byte)" if math.isfinite(final.get(TEST_BPB, math.nan)) else ""))
    for name in sorted({key.split("/", 2)[2] for key in final if key.count("/") == 2}):  # a mixture's sources
        console.print(f"  source {name}: {final.get(f'train/share/{name}', math.nan):.2%} of training tokens, "
                      f"val loss {final.get(f'val/loss/{name}', math.nan):.3f}, {final.get(f'val/bpb/{name}', math.nan):.4f} bpb"
                      + (f"; test loss {final[f'test/loss/{name}']:.3f}, {final[f'test/bpb/{name}']:.4f} bpb" if f"test/loss/{name}" in final else ""))
    for prompt, text in result.samples[:2]:
        console.print(f"[dim]sample:[/] {text[:300]!r}")
    run_id = getattr(result, "run_id", None)
    if run_id and result.run_page:
        console.print(f"run {run_id}: {result.run_page}", soft_wrap=True)
    elif run_id:
        console.print(f"run id {run_id}; browse with [bold]python run.py ui[/] (store: {parse(tracking_uri(cfg)).masked})")
    if result.checkpoint:
        console.print(f"checkpoint: {result.checkpoint}")
