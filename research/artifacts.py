"""A finished run's model, fetched back from MLflow for the commands that use it (`export`, `sample`).

`MLflowHook.on_end` logs the model folder (`save_pretrained`, tokenizer beside it) as the run
artifact `model`; this module downloads that folder and loads it. The store is the one the
config names (tracking.uri=, out_dir=, or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from research.errors import UserError
from research.model import MiniMindForCausalLM
from research.tokenizer import load_tokenizer
from research.tracking import connect, tracking_uri

MODEL_ARTIFACT = "model"  # the run artifact folder MLflowHook writes with save_pretrained


def download_model(cfg: DictConfig, run_id: str, dst: Path) -> Path:
    """Download run `run_id`'s model folder into `dst`; a missing run or model is a one-line UserError."""
    uri = tracking_uri(cfg)
    client = connect(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run '{run_id}' in the MLflow store {uri}; copy a run id from `python run.py ui`, or point tracking.uri / MLFLOW_TRACKING_URI at the store that holds it") from None
    if not client.list_artifacts(run_id, MODEL_ARTIFACT):
        raise UserError(f"run '{run_id}' has no '{MODEL_ARTIFACT}' artifact (it did not finish, or logged no model); pick a run that finished training")
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, MODEL_ARTIFACT, str(dst)))


def load_run_model(cfg: DictConfig, run_id: str):
    """(model, tokenizer) of a logged run, as trained (our `MiniMindForCausalLM`, on the CPU, eval mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = download_model(cfg, run_id, Path(tmp))
        model = MiniMindForCausalLM.from_pretrained(folder)
        tokenizer = load_tokenizer(folder)
    return model.eval(), tokenizer
