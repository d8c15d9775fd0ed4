"""A run's files in MLflow: written when training ends (`write_outputs`), fetched back by `export` and `sample`.

`MLflowHook.on_end` logs the model folder (`save_pretrained`, tokenizer beside it) as the run
artifact `model`, with samples.md and loss_curve.png beside it; `load_run_model` downloads that
folder and loads it, from the store the config names (tracking.uri=, out_dir=, or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from research.errors import UserError
from research.names import MODEL_ARTIFACT, TRAIN_LOSS, VAL_LOSS
from research.store_url import mask_password
from research.tracking_store import connect, tracking_uri

if TYPE_CHECKING:
    from research.trainer import TrainResult


def write_outputs(result: "TrainResult", folder: Path, with_model: bool) -> None:
    """A finished run's artifacts as files: samples.md, and with the model: loss_curve.png, tokenizer/, model/."""
    if result.samples:
        (folder / "samples.md").write_text(samples_markdown(result.samples))
    if not with_model:
        return
    plot_loss_curve(result, folder / "loss_curve.png")
    result.tokenizer.save_pretrained(folder / "tokenizer")
    result.model.save_pretrained(folder / MODEL_ARTIFACT)
    result.tokenizer.save_pretrained(folder / MODEL_ARTIFACT)


def samples_markdown(samples: list[tuple[str, str]]) -> str:
    """Each prompt as a heading and its completion in a fenced block, so the artifact viewer keeps its line breaks."""
    fence = "````"  # longer than any fence a completion could hold
    return "\n\n".join(f"### {prompt}\n\n{fence}text\n{completion.replace(fence, '```')}\n{fence}" for prompt, completion in samples) + "\n"


def plot_loss_curve(result: "TrainResult", path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    train = result.curve(TRAIN_LOSS)
    val = result.curve(VAL_LOSS)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")  # plain numbers on the ticks (not 8x10^0), minor ticks labelled when under a decade is shown
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.7)))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_file_as(client: MlflowClient, run_id: str, path: Path, artifact_path: str) -> None:
    """Log a file under another name, via a hard link beside it (a copy where links fail); replaces an earlier one."""
    folder, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".upload-") as tmp:
        link = Path(tmp) / name
        try:
            os.link(path, link)
        except OSError:
            shutil.copyfile(path, link)
        client.log_artifact(run_id, str(link), folder or None)


def download_model(cfg: DictConfig, run_id: str, dst: Path) -> Path:
    """Download run `run_id`'s model folder into `dst`; a missing run or model is a one-line UserError."""
    uri = tracking_uri(cfg)
    client = connect(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run '{run_id}' in the MLflow store {mask_password(uri)}; copy a run id from `python run.py ui`, or point tracking.uri / MLFLOW_TRACKING_URI at the store that holds it") from None
    if not client.list_artifacts(run_id, MODEL_ARTIFACT):
        raise UserError(f"run '{run_id}' has no '{MODEL_ARTIFACT}' artifact (it did not finish, or logged no model); pick a run that finished training")
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, MODEL_ARTIFACT, str(dst)))


def load_run_model(cfg: DictConfig, run_id: str):
    """(model, tokenizer) of a logged run, as trained (our `MiniMindForCausalLM`, on the CPU, eval mode)."""
    from research.model import MiniMindForCausalLM  # torch and transformers: only for the commands that load a model
    from research.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = download_model(cfg, run_id, Path(tmp))
        model = MiniMindForCausalLM.from_pretrained(folder)
        tokenizer = load_tokenizer(folder)
    return model.eval(), tokenizer
