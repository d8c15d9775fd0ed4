"""A trained run handed to the ecosystem: `run.py export` (plain Llama folder), MLflow's transformers flavor, `run.py sample`."""

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline

from conftest import TINY, run_cli
import run
from research import registry
from research.corpus import iter_documents
from research.errors import UserError
from research.export import LOGGED_MODEL_NAME
from research.runner import run_tracked


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, token_cache):
    """One tiny tracked run shared by the tests below (training it is the slow part)."""
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = {**TINY, "out_dir": str(root / "results"), "data.cache_dir": token_cache, "tracking.uri": uri}
    cfg = registry.build("baseline", settings)
    return cfg, run_tracked(cfg), uri


@pytest.fixture(scope="module")
def exported(tracked, tmp_path_factory):
    cfg, result, uri = tracked
    out = tmp_path_factory.mktemp("exported") / "llama"
    proc = run_cli("export", f"run_id={result.run_id}", f"out={out}", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout
    return out


def test_export_round_trip_gives_our_logits(tracked, exported):
    cfg, result, _ = tracked
    assert json.loads((exported / "config.json").read_text())["model_type"] == "llama"
    hf = AutoModelForCausalLM.from_pretrained(exported)  # no trust_remote_code
    assert type(hf) is LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = next(iter_documents(cfg.data.path, cfg.data.text_key))
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:63]])
    with torch.no_grad():
        ours = result.model.eval()(ids).logits
        theirs = hf.eval()(ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 1e-4


def test_exported_folder_runs_in_a_transformers_pipeline(exported):
    generate = pipeline("text-generation", model=str(exported))
    text = generate("ROMEO:", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_logged_transformers_flavor_loads_and_generates(tracked, monkeypatch):
    _, result, uri = tracked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # how a user points mlflow at the store
    assert mlflow.get_tracking_uri() == uri
    [logged] = MlflowClient(uri).search_logged_models(experiment_ids=[MlflowClient(uri).get_run(result.run_id).info.experiment_id])
    assert logged.name == LOGGED_MODEL_NAME and logged.source_run_id == result.run_id
    generate = mlflow.transformers.load_model(f"runs:/{result.run_id}/{LOGGED_MODEL_NAME}")
    assert type(generate.model) is LlamaForCausalLM
    text = generate("ROMEO:", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_export_refuses_bad_run_missing_model_and_used_folder(tracked, tmp_path):
    _, result, uri = tracked
    with pytest.raises(UserError, match="no run 'nope'"):
        run.main(["export", "run_id=nope", f"out={tmp_path / 'a'}", f"tracking.uri={uri}"])
    client = MlflowClient(uri)
    empty = client.create_run(client.get_run(result.run_id).info.experiment_id).info.run_id
    with pytest.raises(UserError, match="has no 'model' artifact"):
        run.main(["export", f"run_id={empty}", f"out={tmp_path / 'b'}", f"tracking.uri={uri}"])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        run.main(["export", f"run_id={result.run_id}", f"out={tmp_path / 'c'}", f"tracking.uri={uri}"])
    with pytest.raises(UserError, match="needs out="):
        run.main(["export", f"run_id={result.run_id}", f"tracking.uri={uri}"])


def test_sample_prints_a_continuation(tracked):
    _, result, uri = tracked
    proc = run_cli("sample", f"run_id={result.run_id}", "prompt=ROMEO:", "max_new_tokens=16", "seed=3", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout.strip()) > len("ROMEO:")


def test_sample_refuses_bad_input_with_one_line(tracked):
    _, result, uri = tracked
    for args, fragment in [
        (["run_id=nope", "prompt=hi"], "no run 'nope'"),
        ([f"run_id={result.run_id}", "prompt=hi", "temprature=0.5"], "unknown option 'temprature'"),
        ([f"run_id={result.run_id}", "prompt=hi", "top_k=many"], "'top_k'"),
        ([f"run_id={result.run_id}"], "needs prompt="),
    ]:
        with pytest.raises(UserError, match=fragment) as err:  # run.py prints it as one line, exit status 2 (test_cli)
            run.main(["sample", *args, f"tracking.uri={uri}"])
        assert "\n" not in str(err.value)
