"""What a run logs as params and what as tags (research/run_params.py), and how new runs are named (run_naming.py)."""

from types import SimpleNamespace

from conftest import REPO
from research import names
from research.config import make_config
from research.run_naming import next_free_name, trial_run_name
from research.run_params import MACHINE_KEYS, STORE_KEYS, TRAIN_SECTIONS, params_and_tags, split_values, training_facts


def test_values_that_name_this_machine_are_tags_and_the_rest_params():
    params, tags = split_values({
        "train.lr": 0.001,
        "data.path": str(REPO / "data" / "shakespeare.jsonl.gz"),  # inside the repo: a param, made relative
        "data.tokenizer": "/srv/tokenizers/mine",  # outside it: names this machine
        "out_dir": "results",  # a machine key, whatever its value
        "train.device": "cuda:1",
        "train.precision": "auto",
        "sweep.storage": "postgresql://lab:s3cret@db/optuna",
        "data.cache_dir": "",  # an empty machine value: logged as nothing
        "model.note": "see http://example.org",  # a URL anywhere
    })
    assert params == {"train.lr": "0.001", "data.path": "data/shakespeare.jsonl.gz", "train.precision": "auto"}
    assert tags == {"data.tokenizer": "/srv/tokenizers/mine", "out_dir": "results", "train.device": "cuda:1",
                    "sweep.storage": "postgresql://lab:***@db/optuna", "model.note": "see http://example.org"}


def test_a_config_logs_only_its_sections():
    cfg = make_config({"tracking.uri": "http://u:pw@host:5000", "train.checkpoint_dir": "/tmp/ck", "out_dir": "/tmp/out"})
    params, tags = params_and_tags(cfg, TRAIN_SECTIONS)
    assert {"exp", "seed", "train.lr", "model.hidden_size", "data.seq_len"} <= params.keys()
    assert not [k for k in {**params, **tags} if k.startswith(("tracking.", "sweep.", "bench."))]
    assert tags["train.checkpoint_dir"] == "/tmp/ck" and tags["out_dir"] == "/tmp/out" and "out_dir" not in params
    assert not set(MACHINE_KEYS) & params.keys() and set(STORE_KEYS) <= set(MACHINE_KEYS)
    assert params_and_tags(cfg, ("tracking",))[1]["tracking.uri"] == "http://u:***@host:5000"


def test_training_facts_log_the_resolved_compile_setting_beside_the_config():
    run = SimpleNamespace(derived={"tokens per step": 4096, "precision": "bf16, torch.compile", "parameters": 2_852_544},
                          data_info=SimpleNamespace(data_digest="abc", skipped_lines=0), compiled=True)
    params, tags = training_facts(run, world_size=2)
    assert params == {names.TOKENS_PER_STEP: "4096", names.COMPILE_RESOLVED: "true"}
    assert tags == {names.WORLD_SIZE: "2", names.DATA_DIGEST: "abc", names.PRECISION: "bf16, torch.compile", names.PARAMETERS: "2852544",
                    names.SKIPPED_LINES: "0"}
    assert training_facts(SimpleNamespace(**{**vars(run), "compiled": False}), 1)[0][names.COMPILE_RESOLVED] == "false"
    assert names.COMPILE_RESOLVED not in {f"train.{k}" for k in make_config().train}  # not a config key: a reproduction ignores it


def test_new_runs_get_the_next_free_name():
    assert next_free_name("baseline", set()) == "baseline"
    assert next_free_name("baseline", {"baseline"}) == "baseline-2"
    assert next_free_name("baseline", {"baseline", "baseline-2", "baseline-7", "baseline-x", "baseline-sweep"}) == "baseline-8"
    assert trial_run_name("lr_sweep", 7) == "lr_sweep/trial-007"
