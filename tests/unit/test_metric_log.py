"""MetricLog: what the hooks receive from a run's steps, the rates it derives, and where it stops a diverged run."""

import math
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from research.distributed import DistEnv
from research.metrics import MetricLog, NonFiniteLoss
from research.trainer import Hooks

ONE_CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class Recorder(Hooks):
    def __init__(self):
        self.batches, self.evals = [], []

    def on_metrics(self, rows):
        self.batches.append(list(rows))

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))


def make_log(hook: Recorder, check_grad_norm: bool = True, precision: str = "fp32", start_step: int = 0) -> MetricLog:
    return MetricLog(ONE_CPU, [hook], Console(quiet=True), flops_per_token=6e6, peak_flops=1e12, precision=precision,
                     check_grad_norm=check_grad_norm, max_steps=100, start_step=start_step)


def record(log: MetricLog, step: int, loss: float, grad_norm: float = 1.0, tokens: int = 1000, checkpoint: Path | None = None) -> None:
    log.record(step, 1e-3 * step, torch.tensor(loss), torch.tensor(grad_norm), tokens, checkpoint)


def test_a_flush_hands_the_hooks_every_step_once_with_the_rates_on_the_last():
    hook = Recorder()
    log = make_log(hook)
    log.clock.restart(time.perf_counter() - 2.0)  # the interval began 2 s ago
    for step, loss in [(1, 5.0), (2, 4.5)]:
        record(log, step, loss)
    assert hook.batches == []  # nothing is read back before the flush
    log.flush(2, None)
    (rows,) = hook.batches
    assert [step for step, _ in rows] == [1, 2]
    assert rows[0][1] == {"train/loss": 5.0, "train/lr": pytest.approx(1e-3), "train/grad_norm": 1.0}
    last = rows[1][1]
    assert last["train/loss"] == 4.5 and last["train/lr"] == pytest.approx(2e-3)
    assert 800 < last["train/tokens_per_sec"] <= 1000  # 2 steps of 1,000 tokens in a little over 2 s
    assert last["train/mfu"] == pytest.approx(last["train/tokens_per_sec"] * 6e6 / 1e12) and 0.0048 < last["train/mfu"] <= 0.006
    assert last["train/data_wait_share"] == 0 and last["train/tracking_share"] == 0  # no batch was waited for; no hook ran before
    assert log.history == rows

    log.flush(2, None)  # nothing new: no call
    assert len(hook.batches) == 1
    record(log, 3, 4.0)
    log.flush(3, None)
    assert [[step for step, _ in batch] for batch in hook.batches] == [[1, 2], [3]] and len(log.history) == 3


def test_the_data_share_is_the_time_spent_waiting_for_batches():
    hook = Recorder()
    log = make_log(hook)
    with log.clock.timing("data"):
        time.sleep(0.2)
    record(log, 1, 5.0)
    time.sleep(0.05)
    log.flush(1, None)
    share = hook.batches[0][-1][1]["train/data_wait_share"]
    assert 0.5 < share < 1.0  # 0.2 s of about 0.25


def test_a_nan_loss_on_one_cpu_stops_at_that_step_after_the_hooks_have_the_rows():
    hook = Recorder()
    log = make_log(hook)
    record(log, 1, 5.0)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 2; lower train.lr or train.grad_clip \(last good checkpoint: ck/step_1.pt\)") as err:
        record(log, 2, math.nan, checkpoint=Path("ck/step_1.pt"))
    assert err.value.step == 2
    assert [step for step, _ in hook.batches[0]] == [1, 2]


def test_an_infinite_gradient_norm_stops_the_run_unless_a_gradient_scaler_skips_such_steps():
    with pytest.raises(NonFiniteLoss, match=r"gradient norm became inf at step 1; .*or use train.precision=fp32 instead of bf16 \(no checkpoint"):
        record(make_log(Recorder(), precision="bf16"), 1, 5.0, grad_norm=math.inf)
    hook = Recorder()
    log = make_log(hook, check_grad_norm=False, precision="fp16")  # fp16: the scaler skips the step and lowers its scale
    record(log, 1, 5.0, grad_norm=math.inf)
    log.flush(1, None)
    assert hook.batches[0][0][1]["train/grad_norm"] == math.inf


def test_an_eval_goes_to_the_history_and_to_both_hooks():
    hook = Recorder()
    log = make_log(hook)
    log.record_eval(10, {"val/loss": 2.0})
    log.record_eval(20, {"val/loss": 80.0})
    assert log.history == [(10, {"val/loss": 2.0, "val/perplexity": pytest.approx(math.exp(2.0))}),
                           (20, {"val/loss": 80.0, "val/perplexity": pytest.approx(math.exp(50.0))})]  # capped, not an overflow
    assert [step for step, _ in hook.evals] == [10, 20] and [batch[0][0] for batch in hook.batches] == [10, 20]
    assert log.val_loss == 80.0
