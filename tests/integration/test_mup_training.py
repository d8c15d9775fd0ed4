"""μP trains: at its base width it is SP to the last digit, and away from it it is not."""

from research.trainer import train


def losses(cfg) -> list[float]:
    return [loss for _, loss in train(cfg).curve()]


def test_mup_at_the_base_width_trains_exactly_as_sp(tiny_cfg):
    run = {"tracking.enabled": False, "train.max_steps": 6, "train.log_every": 1, "train.eval_every": 0, "train.sample_tokens": 0,
           "train.lr": 1e-2}
    sp = losses(tiny_cfg(**run))
    at_base = losses(tiny_cfg(**run, **{"model.parametrization": "mup", "model.base_width": 64}))
    assert len(sp) == 6 and max(abs(a - b) for a, b in zip(sp, at_base)) <= 1e-6
    wider = losses(tiny_cfg(**run, **{"model.parametrization": "mup", "model.base_width": 32}))  # m = 2: not SP
    assert max(abs(a - b) for a, b in zip(sp, wider)) > 1e-3
