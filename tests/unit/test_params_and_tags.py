"""The split of a run's config into params (the same text on every machine) and tags (what names this machine)."""

from conftest import REPO
from research.config import make_config
from research.run_params import SWEEP_SECTIONS, TRAIN_SECTIONS, params_and_tags, portable_value


def split(overrides: dict, sections=TRAIN_SECTIONS) -> tuple[dict, dict]:
    return params_and_tags(make_config(overrides), sections)


def test_two_machines_log_the_same_params_and_differ_only_in_tags():
    here = {"out_dir": "/srv/alice/results", "data.cache_dir": "/scratch/cache", "train.checkpoint_dir": "/srv/alice/ckpt",
            "train.device": "cuda:0", "data.path": str(REPO / "tests" / "data" / "tang_song.jsonl")}
    there = {"out_dir": "/home/bob/out", "data.cache_dir": "/tmp/c", "train.checkpoint_dir": "/home/bob/ckpt",
             "train.device": "cuda:3", "data.path": "tests/data/tang_song.jsonl"}
    (params_a, tags_a), (params_b, tags_b) = split(here), split(there)
    assert params_a == params_b
    assert params_a["data.path"] == "tests/data/tang_song.jsonl"  # a path inside the repo, made relative
    assert tags_a == {"out_dir": "/srv/alice/results", "data.cache_dir": "/scratch/cache", "train.checkpoint_dir": "/srv/alice/ckpt", "train.device": "cuda:0"}
    assert tags_b["train.device"] == "cuda:3"


def test_values_that_change_results_are_params_in_the_config_text():
    params, tags = split({"train.lr": "0.003", "model.dropout": "0.1", "seed": "7", "train.device": "cpu"})
    assert (params["train.lr"], params["model.dropout"], params["seed"], params["train.device"]) == ("0.003", "0.1", "7", "cpu")
    assert params["exp"] == "baseline" and params["model.tie_word_embeddings"] == "True"
    assert not set(params) & set(tags)


def test_only_the_given_sections_are_logged():
    params, tags = split({"tracking.run_name": "mine", "sweep.n_trials": "5"})
    assert {key.split(".")[0] for key in params} <= set(TRAIN_SECTIONS)
    params, _ = split({"sweep.n_trials": "5"}, SWEEP_SECTIONS)
    assert params["sweep.n_trials"] == "5"


def test_empty_machine_keys_are_neither_and_urls_are_tags_with_the_password_masked():
    params, tags = split({"train.resume_from": "", "data.path": "postgresql://lab:s3cret@db.example:5432/corpus"})
    assert "train.resume_from" not in params and "train.resume_from" not in tags
    assert tags["data.path"] == "postgresql://lab:***@db.example:5432/corpus"
    assert "data.path" not in params


def test_long_values_are_cut_to_what_mlflow_stores():
    params, _ = split({"data.text_key": "k" * 7000})
    assert params["data.text_key"] == "k" * 6000


def test_portable_value():
    assert portable_value("train.lr", 0.001) == "0.001"
    assert portable_value("data.path", "data/x.jsonl") == "data/x.jsonl"  # relative: the same everywhere
    assert portable_value("data.path", str(REPO / "data" / "x.jsonl")) == "data/x.jsonl"
    assert portable_value("data.path", "/elsewhere/x.jsonl") is None
    assert portable_value("data.path", "~/x.jsonl") is None  # a home folder outside the repo
    assert portable_value("out_dir", "results") is None  # a machine key, whatever its value
    assert portable_value("data.path", "http://host/x.jsonl") is None
    assert portable_value("train.device", "cuda") == "cuda" and portable_value("train.device", "cuda:1") is None
