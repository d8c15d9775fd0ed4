"""The coordinate check (`exp=coord_check`): mean |activation| of each layer over the first steps, at several widths, SP and μP.

μP's promise is that every activation's typical size stays the same as the width grows, at
initialisation and after updates; under SP the logits (and, at a high lr, the blocks' outputs) grow
with the width once training moves the weights. This trains each width for a few steps at one fixed
lr with the run's own step (research/step.py), records the mean |x| of the embedding's output (what
block 0 reads), of each block's output and of the logits on each training batch, averages over
seeds, and plots them against the width: flat lines are what μP should give (Yang et al. 2022, fig. 5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from research import distributed
from research.components import build
from research.config import apply_overrides
from research.hardware import machine_summary

PARAMETRIZATIONS = ("sp", "mup")


def layer_names(num_layers: int) -> list[str]:
    return ["embedding", *[f"block {i}" for i in range(num_layers)], "logits"]


def record(cfg: DictConfig, steps: int) -> np.ndarray:
    """(steps, layers): mean |activation| of each layer during each of the first `steps` training steps of `cfg`."""
    env = distributed.setup(cfg.train.device)
    run = build(cfg, env)
    model, rows, current = run.state.model, [], {}

    def keep(name):
        def hook(module, args, output=None):
            x = args[0] if output is None else (output.logits if name == "logits" else output)
            current[name] = x.detach().float().abs().mean().item()
        return hook

    handles = [model.model.layers[0].register_forward_pre_hook(keep("embedding")), model.register_forward_hook(keep("logits"))]
    handles += [block.register_forward_hook(keep(f"block {i}")) for i, block in enumerate(model.model.layers)]
    model.train()
    try:
        for _ in range(steps):
            run.step.advance(cfg.train.lr)  # a constant lr, as in mup's coordinate checks
            rows.append([current[name] for name in layer_names(len(model.model.layers))])
    finally:
        for handle in handles:
            handle.remove()
    return np.array(rows)


def measure(cfg: DictConfig, widths: list[int], seeds: int, steps: int) -> dict:
    """{parametrization: {width: (steps, layers) means over seeds}} as nested lists, with what produced them."""
    curves = {}
    for parametrization in PARAMETRIZATIONS:
        curves[parametrization] = {}
        for width in widths:
            runs = []
            for seed in range(cfg.seed, cfg.seed + seeds):
                run_cfg = apply_overrides(cfg.copy(), {"model.hidden_size": width, "model.parametrization": parametrization, "seed": seed})
                runs.append(record(run_cfg, steps))
            curves[parametrization][str(width)] = np.mean(runs, axis=0).tolist()
            print(f"coord check {parametrization} width {width}: logits {curves[parametrization][str(width)][-1][-1]:.3g} at step {steps}", flush=True)
    return {"curves": curves, "widths": widths, "seeds": seeds, "steps": steps, "layers": layer_names(cfg.model.num_hidden_layers),
            "lr": cfg.train.lr, "base_width": cfg.model.base_width, "machine": machine_summary(cfg.train)}


def slopes(result: dict) -> dict[str, dict[str, float]]:
    """{parametrization: {layer: d log(mean |x|) / d log(width)}} at the last step: 0 is flat, 1 grows like the width."""
    log_w = np.log(result["widths"])
    out = {}
    for parametrization, by_width in result["curves"].items():
        last = np.log([by_width[str(w)][-1] for w in result["widths"]])  # (widths, layers)
        out[parametrization] = {name: float(np.polyfit(log_w, last[:, i], 1)[0]) for i, name in enumerate(result["layers"])}
    return out


def plot(result: dict, path: Path) -> Path:
    """One panel per parametrization and step: mean |x| against width, a line per layer, both axes log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, widths = result["steps"], result["widths"]
    fig, axes = plt.subplots(2, steps, figsize=(2.6 * steps, 5.6), sharex=True, sharey="row")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(result["layers"])))
    for row, parametrization in enumerate(PARAMETRIZATIONS):
        for step in range(steps):
            ax = axes[row][step]
            for i, name in enumerate(result["layers"]):
                ax.plot(widths, [result["curves"][parametrization][str(w)][step][i] for w in widths], "o-", color=colors[i], label=name, ms=3)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'SP' if parametrization == 'sp' else 'μP'}, step {step + 1}", fontsize=9)
            ax.set_xlabel("width") if row == 1 else None
        axes[row][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"coordinate check: lr {result['lr']:g}, μP base width {result['base_width']}, mean of {result['seeds']} seeds; "
                 f"{result['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out: Path) -> list[Path]:
    """coord_check.json (the numbers), coord_check.png and coord_check.md (the slopes) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "coord_check.json"
    data.write_text(json.dumps(result, indent=1))
    image = plot(result, out / "coord_check.png")
    lines = [f"# Coordinate check\n", f"Mean |activation| per layer during the first {result['steps']} steps at constant lr {result['lr']:g}, "
             f"widths {result['widths']}, μP base width {result['base_width']}, mean of {result['seeds']} seeds; "
             f"{result['machine']}.\n",
             "![coordinate check](coord_check.png)\n", f"Slope of log mean |x| against log width at step {result['steps']} "
             "(0 = flat across widths, 1 = grows like the width):\n", "| layer | SP | μP |", "|---|---|---|"]
    s = slopes(result)
    lines += [f"| {name} | {s['sp'][name]:+.2f} | {s['mup'][name]:+.2f} |" for name in result["layers"]]
    report = out / "coord_check.md"
    report.write_text("\n".join(lines) + "\n")
    return [data, image, report]


def log_to_mlflow(cfg: DictConfig, result: dict, files: list[Path]) -> str:
    """One MLflow run holding the slopes as metrics and the report's files as artifacts; returns its id."""
    from research.tracking import mlflow_run

    with mlflow_run(cfg) as (client, run_id):
        for key, value in {"widths": result["widths"], "lr": result["lr"], "base_width": result["base_width"], "steps": result["steps"]}.items():
            client.log_param(run_id, f"coord_check.{key}", str(value))
        for parametrization, by_layer in slopes(result).items():
            for name, value in by_layer.items():
                if math.isfinite(value):
                    client.log_metric(run_id, f"slope/{parametrization}/{name.replace(' ', '_')}", value)
        for path in files:
            client.log_artifact(run_id, str(path))
    return run_id
