"""Overrides as a user types them: run.py's parser, the config's key and type checks, and the checks on values."""

import pytest

from research.config import apply_overrides, make_config, validate
from research.errors import UserError
from run import REQUIRED, parse

OPTIONS = {"exp": (str, "baseline"), "port": (int, 5000), "allow_data_change": (bool, False), "run_id": (str, REQUIRED)}


def test_parse_splits_typed_options_from_config_overrides():
    options, overrides = parse("cmd", ["run_id=abc", "port=8080", "allow_data_change=TRUE", "train.lr=3e-4", "tracking.run_name=a=b", "seed=3"], OPTIONS)
    assert options == {"run_id": "abc", "port": 8080, "allow_data_change": True, "exp": "baseline"}
    assert overrides == {"train.lr": "3e-4", "tracking.run_name": "a=b", "seed": "3"}  # values stay text: the config types them


def test_parse_passes_any_dotted_name_to_the_config_which_refuses_it_with_suggestions():
    _, overrides = parse("cmd", ["run_id=x", "train.lrr=1"], OPTIONS)
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr'; did you mean train.lr or "):
        make_config(overrides)


@pytest.mark.parametrize("args, message", [
    (["run_id=x", "prot=1"], r"unknown option 'prot' for `run.py cmd`; did you mean port\?"),
    (["run_id=x", "bogus=1"], r"unknown option 'bogus' .* options: exp, port, allow_data_change, run_id, and config keys"),
    (["run_id=x", "port=http"], r"bad value for 'port': 'http' is not a valid int"),
    (["run_id=x", "allow_data_change=yes"], r"bad value for 'allow_data_change': 'yes' is not true or false"),
    (["run_id"], r"expected key=value, got 'run_id'"),
    (["port=1"], r"`run.py cmd` needs run_id=\.\.\.; usage: python run.py cmd exp=\.\.\. port=\.\.\."),
])
def test_parse_refuses_bad_arguments_in_one_line(args, message):
    with pytest.raises(UserError, match=message) as err:
        parse("cmd", args, OPTIONS)
    assert "\n" not in str(err.value)


def test_override_values_are_typed_by_the_schema():
    cfg = make_config(["train.lr=3e-4", "data.packing=false", "data.path=[a.jsonl, b.jsonl]", "train.max_steps=7"])
    assert cfg.train.lr == 3e-4 and cfg.data.packing is False and list(cfg.data.path) == ["a.jsonl", "b.jsonl"] and cfg.train.max_steps == 7
    cfg = make_config({"train.lr": 0.5, "model.dropout": "0.25"})  # values from code, or text
    assert cfg.train.lr == 0.5 and cfg.model.dropout == 0.25
    assert make_config(["train.checkpoint_dir=", "tracking.uri="]).train.checkpoint_dir == ""  # an empty value is "", not null


def test_overrides_apply_in_order_onto_a_given_config():
    cfg = make_config(["train.lr=0.1"])
    assert apply_overrides(cfg, ["train.lr=0.2", "train.lr=0.3"]) is cfg and cfg.train.lr == 0.3


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown config key 'train.lrr'; did you mean train.lr or .*\? valid keys under 'train': train.max_steps, "),
    ("trian.lr=1", r"unknown config key 'trian.lr'; did you mean train.lr or .* valid sections: bench, data, exp, "),
    ("nosuch=1", r"unknown config key 'nosuch'; valid sections: bench, data, "),  # no close match: no suggestion
    ("train.max_steps=ten", r"bad value for 'train.max_steps': 'ten' is not a valid int"),
    ("train.max_steps=", r"bad value for 'train.max_steps': '' is not a valid int"),
    ("data.packing=maybe", r"bad value for 'data.packing': 'maybe' is not a valid bool"),
    ("train.lr", r"expected key=value, got 'train.lr'"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message) as err:
        make_config([override])
    assert "\n" not in str(err.value)


def test_the_defaults_and_the_edges_of_each_range_are_valid():
    validate(make_config())
    validate(make_config(["train.warmup_steps=0", "train.min_lr_ratio=0", "train.eval_every=0", "data.workers=0", "train.max_skipped_steps=0"]))
    validate(make_config(["train.max_steps=10", "train.warmup_steps=10", "train.min_lr_ratio=1", "train.compile=TRUE"]))


@pytest.mark.parametrize("overrides, message", [
    (["train.max_steps=0"], "train.max_steps must be > 0, got 0"),
    (["train.batch_size=0"], "train.batch_size must be > 0"),
    (["train.grad_accum=0"], "train.grad_accum must be > 0"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.max_steps=10", "train.warmup_steps=11"], r"train.warmup_steps must be in \[0, train.max_steps=10\], got 11"),
    (["train.warmup_steps=-1"], "train.warmup_steps must be in"),
    (["train.min_lr_ratio=1.01"], r"train.min_lr_ratio must be in \[0, 1\]"),
    (["train.compile=maybe"], "train.compile must be auto, true or false, got 'maybe'"),
    (["train.adamw=sgd"], "train.adamw must be fused or foreach"),
    (["train.precision=fp8"], "train.precision must be auto, fp32, bf16 or fp16"),
    (["train.log_every=0"], "train.log_every > 0"),
    (["train.eval_every=-1"], "train.eval_every must be >= 0"),
    (["train.max_skipped_steps=-1"], "train.max_skipped_steps must be >= 0"),
    (["data.seq_len=1"], "data.seq_len must be > 1"),
    (["data.seq_len=4096", "model.max_position_embeddings=2048"], r"data.seq_len \(4096\) exceeds model.max_position_embeddings \(2048\)"),
    (["data.val_fraction=0"], r"data.val_fraction must be in \(0, 1\)"),
    (["data.val_fraction=1"], r"data.val_fraction must be in \(0, 1\)"),
    (["data.workers=-1"], "data.workers must be >= 0"),
    (["data.path=[a.jsonl, 3]"], "data.path must be a path, a glob or a list of them"),
    (["bench.steps=0"], "bench.steps must be > 0"),
    (["bench.load=[spinners, gpu]"], "bench.load takes spinners and/or training"),
    (["sweep.pruner=asha"], "sweep.pruner must be hyperband, median or none"),
    (["sweep.heartbeat_s=60", "sweep.grace_s=60"], "need 0 < sweep.heartbeat_s < sweep.grace_s"),
    (["sweep.max_retries=-1"], "sweep.max_retries >= 0"),
    (["data.test_fraction=-0.1"], "data.test_fraction must be >= 0"),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"], r"leave documents to train on \(val \+ test < 1\)"),
    (["train.test_batches=-1"], "train.test_batches must be >= 0"),
    (["sweep.sampler=random"], "sweep.sampler must be tpe or grid"),
    (["sweep.choose_by=median"], "sweep.choose_by must be worst, mean_plus_sd or mean"),
    (["sweep.eval_seeds=-1"], "eval_seeds, prune_after_steps and prune_after_trials must be >= 0"),
    (["train.precision=fp16", "train.device=cpu"], "train.precision=fp16 needs a CUDA device"),
])
def test_impossible_values_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        validate(make_config(overrides))
    assert "\n" not in str(err.value)
