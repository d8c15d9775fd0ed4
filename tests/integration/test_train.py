"""The training loop end to end: a tiny run logged to a temporary MLflow store, read back as a user would."""

import math

import torch
from mlflow.tracking import MlflowClient

from research.runner import run_tracked
from research.tracking_store import tracking_uri
from research.step import masked_cross_entropy
from research.trainer import Hooks, train


def test_padding_positions_do_not_change_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    loss = masked_cross_entropy(logits, labels, mask, mask.sum())
    scrambled = logits.clone()
    scrambled[0, 3:] = torch.randn(2, 11) * 100  # garbage where the mask is 0
    other_labels = labels.clone()
    other_labels[0, 3:] = 0
    assert torch.equal(loss, masked_cross_entropy(scrambled, other_labels, mask, mask.sum()))
    kept = torch.nn.functional.cross_entropy(torch.cat([logits[0, :3], logits[1]]), torch.cat([labels[0, :3], labels[1]]))
    assert torch.allclose(loss, kept)
    scrambled[0, 0, labels[0, 0]] += 1.0  # a kept position does change it
    assert not torch.equal(loss, masked_cross_entropy(scrambled, labels, mask, mask.sum()))


def test_tracked_run_logs_params_metrics_and_artifacts(tiny_cfg):
    cfg = tiny_cfg()
    result = run_tracked(cfg)
    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["model.hidden_size"] == "64"
    assert run.data.tags["experiment"] == "baseline" and len(run.data.tags["git.commit"]) > 0
    assert run.data.tags["data.digest"] and run.data.tags["torch"] == torch.__version__
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in sorted(losses, key=lambda m: m.step)] == list(range(1, cfg.train.max_steps + 1))
    for name in ["train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "val/loss", "val/perplexity"]:
        assert client.get_metric_history(result.run_id, name), name
    for name in ["train/data_wait_share", "train/tracking_share"]:  # shares of the log interval's wall time
        shares = [m.value for m in client.get_metric_history(result.run_id, name)]
        assert shares and all(0.0 <= v < 1.0 for v in shares), (name, shares)
    val = sorted(client.get_metric_history(result.run_id, "val/loss"), key=lambda m: m.step)
    assert [m.step for m in val] == [6, 12]
    assert math.isclose(val[-1].value, result.final_val_loss)
    assert math.isclose(client.get_metric_history(result.run_id, "val/perplexity")[-1].value, math.exp(val[-1].value), rel_tol=1e-6)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "loss_curve.png", "samples.md", "model", "tokenizer"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/config.json" in model_files and "model/model.safetensors" in model_files
    # the loss fell: the last logged train loss is below the first
    values = [m.value for m in sorted(losses, key=lambda m: m.step)]
    assert values[-1] < values[0]


def test_padded_mode_trains_and_hooks_see_every_step(tiny_cfg):
    seen = []

    class Recorder(Hooks):
        def on_metrics(self, rows):
            seen.extend(step for step, row in rows if "train/loss" in row)

    cfg = tiny_cfg(data__packing=False, tracking__enabled=False, train__grad_accum=2)
    result = train(cfg, [Recorder()])
    assert seen == list(range(1, cfg.train.max_steps + 1))
    assert math.isfinite(result.final_val_loss)
    assert result.tokens_seen == cfg.train.max_steps * 4 * 64 * 2


def test_same_seed_same_curve_different_seed_different_curve(tiny_cfg):
    a = train(tiny_cfg(tracking__enabled=False, train__max_steps=4, train__sample_tokens=0))
    b = train(tiny_cfg(tracking__enabled=False, train__max_steps=4, train__sample_tokens=0))
    c = train(tiny_cfg(tracking__enabled=False, train__max_steps=4, train__sample_tokens=0, seed=7))
    assert a.curve() == b.curve()
    assert a.curve() != c.curve()


def test_bf16_on_a_cpu_without_fast_bf16_warns(tiny_cfg, capsys):
    from research.hardware import cpu_has_fast_bf16

    train(tiny_cfg(tracking__enabled=False, train__max_steps=2, train__warmup_steps=1, train__sample_tokens=0, train__precision="bf16", train__device="cpu"))
    warned = "bf16 matrix products are emulated" in capsys.readouterr().out
    assert warned is (not cpu_has_fast_bf16())
