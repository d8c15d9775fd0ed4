"""A study's stages on synthetic trials: what is chosen on which seeds, what the report's figures are made of, and how a study grows."""

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

import optuna
from research import registry, study_plan
from research.study_plan import SEED_ATTR, STAGE_ATTR, TEST_LOSS_ATTR, choose, configurations, plan
from research.sweep_report import summarise

SPACE_KEYS = ("train.lr",)
DIST = {"train.lr": FloatDistribution(1e-4, 1e-1, log=True)}


@pytest.fixture
def cfg(tmp_path):
    return registry.build("lr_sweep", {"out_dir": str(tmp_path), "sweep.confirm_top_k": 2, "sweep.confirm_seeds": 2, "sweep.eval_seeds": 3,
                                       "train.lr": 3e-3})


def add(study, lr, stage, seed, val, test=None, state=TrialState.COMPLETE):
    attrs = {STAGE_ATTR: stage, SEED_ATTR: seed, **({TEST_LOSS_ATTR: test} if test is not None else {})}
    study.add_trial(create_trial(params={"train.lr": lr}, distributions=DIST, value=val if state == TrialState.COMPLETE else None,
                                 user_attrs=attrs, state=state))


def finish(study, needed, values):
    """Train what the plan asked for, with the losses `values(lr, seed)` gives: (val, test)."""
    for params, attrs in needed:
        val, test = values(params["train.lr"], attrs[SEED_ATTR])
        add(study, params["train.lr"], attrs[STAGE_ATTR], attrs[SEED_ATTR], val, test)


def default_params(cfg):
    return {"train.lr": cfg.train.lr}


def test_a_configuration_best_only_on_its_search_seed_is_not_distinguishable_and_its_figures_exclude_what_chose_it(cfg, tmp_path):
    cfg.sweep.confirm_top_k = 1  # the lucky configuration is the only candidate: it becomes the answer
    study = optuna.create_study()
    s = cfg.seed
    add(study, 3e-3, "default", s, 4.90)
    add(study, 5e-3, "search", s, 4.60)  # best by far, but only at the search seed
    add(study, 8e-3, "search", s, 5.40)
    noise = {s + 1: 0.0, s + 2: -0.02, s + 1000: 0.05, s + 1001: -0.04, s + 1002: 0.01}

    def losses(lr, seed):  # away from the search seed, 5e-3 is the default's equal, give or take the seed
        return 4.90 + (noise[seed] if lr == 5e-3 else 0.0), 4.95 + (noise[seed] if lr == 5e-3 else 0.0)

    stage, needed = plan(study.get_trials(), cfg, default_params(cfg))
    assert stage == "confirm" and sorted((p["train.lr"], a[SEED_ATTR]) for p, a in needed) == [(5e-3, s + 1), (5e-3, s + 2)]
    finish(study, needed, losses)
    stage, needed = plan(study.get_trials(), cfg, default_params(cfg))
    assert stage == "evaluate" and sorted((p["train.lr"], a[SEED_ATTR]) for p, a in needed) == sorted(
        (lr, s + 1000 + i) for lr in (5e-3, 3e-3) for i in range(3))
    finish(study, needed, losses)
    assert plan(study.get_trials(), cfg, default_params(cfg)) == ("done", [])  # a rerun adds nothing

    summarise(study, cfg, cfg, {"train.lr": registry.search_space("lr_sweep")["train.lr"]}, "memory", None, None, Console(quiet=True))
    summary = (tmp_path / "sweeps" / study.study_name / "summary.md").read_text()
    evaluation = next(line for line in summary.splitlines() if line.startswith("**evaluation**"))
    assert "**answer**: train.lr=0.005" in summary and "not distinguishable at n = 3" in evaluation
    eval_tests = [t.user_attrs[TEST_LOSS_ATTR] for t in study.get_trials() if t.user_attrs[STAGE_ATTR] == "evaluate" and t.params["train.lr"] == 5e-3]
    assert f"test loss at seeds [{s + 1000}, {s + 1001}, {s + 1002}]" in evaluation
    assert f"answer {sum(eval_tests) / 3:.4f}" in evaluation  # the answer's figure: its evaluation runs alone
    chosen_on = [t.value for t in study.get_trials() if t.params["train.lr"] == 5e-3 and t.user_attrs[STAGE_ATTR] != "evaluate"]
    assert not any(f"{v:.4f}" in evaluation for v in chosen_on + [4.60])  # no figure of a run it was chosen on


def confirmed(cfg, confirm: dict) -> list:
    """The configurations of a study whose search ranked 5e-3 first, confirmed at two new seeds with the losses `confirm[lr, seed]`."""
    study = optuna.create_study()
    s = cfg.seed
    add(study, 3e-3, "default", s, 4.90)
    add(study, 5e-3, "search", s, 4.60)
    add(study, 2e-3, "search", s, 4.85)
    finish(study, plan(study.get_trials(), cfg, default_params(cfg))[1], lambda lr, seed: (confirm[lr, seed - s], 0.0))
    return configurations(study.get_trials(), default_params(cfg))


def test_the_worst_seed_rule_passes_over_a_configuration_next_to_a_cliff(cfg):
    steady = {(2e-3, 1): 4.86, (2e-3, 2): 4.88}
    configs = confirmed(cfg, {(5e-3, 1): 4.70, (5e-3, 2): 5.20, **steady})  # 5e-3: one bad seed, a worse mean too
    assert choose(configs, cfg).params == {"train.lr": 2e-3}
    cfg.sweep.choose_by = "mean"
    assert choose(configs, cfg).params == {"train.lr": 2e-3}  # 4.87 < 4.95
    configs = confirmed(cfg, {(5e-3, 1): 4.70, (5e-3, 2): 4.95, **steady})  # a milder bad seed: the lower mean
    assert choose(configs, cfg).params == {"train.lr": 5e-3}  # mean 4.825 against 4.87
    cfg.sweep.choose_by = "worst"
    assert choose(configs, cfg).params == {"train.lr": 2e-3}  # worst seed 4.88 against 4.95


def test_raising_n_trials_can_change_the_answer_and_reuses_what_already_ran(cfg):
    study = optuna.create_study()
    s = cfg.seed
    add(study, 3e-3, "default", s, 4.90)
    add(study, 2e-3, "search", s, 4.85)
    add(study, 8e-3, "search", s, 5.40)

    def losses(lr, seed):
        val = {3e-3: 4.90, 2e-3: 4.85, 8e-3: 5.40, 1.5e-3: 4.70}[lr]
        return val, val + 0.02

    for _ in range(2):  # confirm, then evaluate
        finish(study, plan(study.get_trials(), cfg, default_params(cfg))[1], losses)
    assert choose(configurations(study.get_trials(), default_params(cfg)), cfg).params == {"train.lr": 2e-3}
    before = len(study.get_trials())
    assert plan(study.get_trials(), cfg, default_params(cfg)) == ("done", [])

    add(study, 1.5e-3, "search", s, 4.70)  # sweep.n_trials raised: a new search trial, better than the answer
    stage, needed = plan(study.get_trials(), cfg, default_params(cfg))
    assert stage == "confirm" and {(p["train.lr"], a[SEED_ATTR]) for p, a in needed} == {(1.5e-3, s + 1), (1.5e-3, s + 2)}  # 2e-3's are reused
    finish(study, needed, losses)
    stage, needed = plan(study.get_trials(), cfg, default_params(cfg))
    assert choose(configurations(study.get_trials(), default_params(cfg)), cfg).params == {"train.lr": 1.5e-3}  # the answer changed
    assert stage == "evaluate" and {p["train.lr"] for p, _ in needed} == {1.5e-3}  # the default's evaluation runs are reused
    finish(study, needed, losses)
    assert plan(study.get_trials(), cfg, default_params(cfg)) == ("done", []) and len(study.get_trials()) == before + 1 + 2 + 3


def test_queued_and_failed_runs_are_not_planned_twice_and_duplicates_are_found(cfg):
    study = optuna.create_study()
    s = cfg.seed
    add(study, 3e-3, "default", s, 4.90)
    add(study, 2e-3, "search", s, 4.85)
    add(study, 2e-3, "confirm", s + 1, None, state=TrialState.FAIL)  # failed: not retried by the plan
    study.enqueue_trial({"train.lr": 2e-3}, user_attrs={STAGE_ATTR: "confirm", SEED_ATTR: s + 2})  # queued by another worker
    stage, needed = plan(study.get_trials(), cfg, default_params(cfg))
    assert stage == "confirm" and needed == []  # waits for the queued one
    trials = study.get_trials()
    add(study, 2e-3, "confirm", s + 2, 4.86)
    twin = study.get_trials()[-1]
    assert study_plan.duplicate_of(twin, study.get_trials()) is None  # the queued one is WAITING, not run: the later one may run
    assert study_plan.duplicate_of(trials[-1], study.get_trials()) is None
    study.enqueue_trial({"train.lr": 2e-3}, user_attrs={STAGE_ATTR: "confirm", SEED_ATTR: s + 2})  # planned twice at once
    assert study_plan.duplicate_of(study.get_trials()[-1], study.get_trials()).number == twin.number
    study.enqueue_trial({}, user_attrs={STAGE_ATTR: "search", SEED_ATTR: s})
    study.enqueue_trial({}, user_attrs={STAGE_ATTR: "search", SEED_ATTR: s})
    assert study_plan.duplicate_of(study.get_trials()[-1], study.get_trials()) is None  # search trials get their values when they start
