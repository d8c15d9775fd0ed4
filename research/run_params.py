"""What a run logs as params and what as tags: the config split by whether a value names this machine.

Params read the same on any machine, so MLflow's Compare diffs only what changes results;
values that name this machine (folders, stores, a numbered device) are tags. The config keys
that always name the machine are listed here, once: `MACHINE_KEYS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from research import names
from research.config import REPO_ROOT, flatten
from research.store_url import mask_password

if TYPE_CHECKING:
    from research.trainer import RunInfo

# The config sections each kind of run logs as params (what its numbers depend on). `tracking.*` is left
# out (where and under which name a run is logged changes no number); `out_dir` is logged, as a tag.
TRAIN_SECTIONS = ("exp", "seed", "out_dir", "data", "model", "train")
SWEEP_SECTIONS = (*TRAIN_SECTIONS, "sweep")  # a study's parent run: the recipe and the search space
# Keys whose value names this machine (folders, stores): tags, whatever their value, and overrides that a resume or
# reproduction accepts (they cannot change a number). STORE_KEYS locate a run's store: a command that names the run repeats them.
STORE_KEYS = ("out_dir", "tracking.uri")
MACHINE_KEYS = (*STORE_KEYS, "data.cache_dir", "train.checkpoint_dir", "train.resume_from", "sweep.storage", "sweep.report_dir", "bench.out")
PARAM_CHARS, TAG_CHARS = 6000, 5000  # MLflow's limits on a param's and a tag's value


def params_and_tags(cfg: DictConfig, sections: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """The config keys of `sections` split into params (same text on any machine) and tags (values that name this machine).
    Absolute paths outside the repo, URLs and a numbered device (cuda:1) are tags too, whatever their key."""
    return split_values({key: value for key, value in flatten(cfg).items() if key.split(".")[0] in sections})


def split_values(values: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """{key: value} as (params, tags): see params_and_tags; an empty machine value is left out, a password masked."""
    params, tags = {}, {}
    for key, value in values.items():
        text = portable_value(key, value)
        if text is not None:
            params[key] = text[:PARAM_CHARS]
        elif str(value):
            tags[key] = mask_password(str(value))[:TAG_CHARS]
    return params, tags


def portable_value(key: str, value: Any) -> str | None:
    """`value` as text that reads the same on every machine (a path inside the repo made relative), or None."""
    text = str(value)
    if key in MACHINE_KEYS or "://" in text or (key == "train.device" and ":" in text):
        return None
    if text.startswith(("/", "~")):
        path = Path(text).expanduser().resolve()
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else None
    return text


def training_facts(run: "RunInfo", world_size: int) -> tuple[dict[str, str], dict[str, str]]:
    """What a training run knows once built, beside its config: (params, tags).

    Params: the global batch in tokens (it changes results; how many ranks took it does not) and what
    train.compile resolved to. Tags: the ranks, data digest, precision and size of this start.
    """
    params = {names.TOKENS_PER_STEP: str(run.derived["tokens per step"]), names.COMPILE_RESOLVED: str(bool(run.compiled)).lower()}
    tags = {
        names.WORLD_SIZE: str(world_size),
        names.DATA_DIGEST: run.data_info.data_digest,
        names.PRECISION: run.derived["precision"],
        names.PARAMETERS: str(run.derived["parameters"]),
        names.SKIPPED_LINES: str(run.data_info.skipped_lines),
    }
    return params, tags
