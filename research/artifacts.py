"""A finished run's model, fetched back from MLflow for the commands that use it (`export`, `sample`).

`MLflowHook.on_end` logs the model folder (`save_pretrained`, tokenizer beside it) as the run
artifact `model`; this module downloads that folder and loads it. The commands take `name=value`
arguments like training does: their own options (run_id=, out=, prompt=, ...) plus any config key
that says where the store is (tracking.uri=, out_dir=).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from research.config import make_config, valid_keys
from research.errors import UserError

MODEL_ARTIFACT = "model"  # the run artifact folder MLflowHook writes with save_pretrained


def parse_command(command: str, args: list[str], options: dict[str, tuple[type, Any]]) -> tuple[dict[str, Any], DictConfig]:
    """Split `name=value` args into the command's options {name: (type, default)} and config overrides.

    A default of `...` marks a required option. Returns ({option: typed value}, config).
    """
    usage = f"usage: python run.py {command} " + " ".join(f"{name}=..." for name in options)
    values, overrides = {}, []
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"expected name=value, got '{arg}'; {usage}")
        if name in options:
            kind = options[name][0]
            try:
                values[name] = kind(value)
            except ValueError:
                raise UserError(f"bad value for '{name}': {value!r} is not a valid {kind.__name__}") from None
        elif name in valid_keys():
            overrides.append(arg)
        else:
            raise UserError(f"unknown option '{name}' for `run.py {command}`; options: {', '.join(options)} (and config keys such as tracking.uri)")
    for name, (_, default) in options.items():
        if name not in values:
            if default is ...:
                raise UserError(f"`run.py {command}` needs {name}=...; {usage}")
            values[name] = default
    return values, make_config(overrides)


def download_model(cfg: DictConfig, run_id: str, dst: Path) -> Path:
    """Download run `run_id`'s model folder into `dst`; a missing run or model is a one-line UserError."""
    from mlflow.exceptions import MlflowException

    from research.tracking import connect, tracking_uri

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
    import tempfile

    from research.model import MiniMindForCausalLM
    from research.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = download_model(cfg, run_id, Path(tmp))
        model = MiniMindForCausalLM.from_pretrained(folder)
        tokenizer = load_tokenizer(folder)
    return model.eval(), tokenizer
