"""Every knob of a run, defined once with a one-line comment.

The dataclasses are the schema of an OmegaConf structured config: `key=value`
overrides are type-checked against them, and unknown keys are refused. Each
component takes only its own section (`DataConfig`, `ModelConfig`, ...).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from research.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SourceConfig:
    """One source of a mixture (data.sources): its shards, its share of the training tokens, the name its metrics are logged under."""

    name: str = ""  # metrics val/loss/<name>, val/bpb/<name>; letters, digits, - _ .
    path: Any = ""  # as data.path: a file, folder, glob or list of them
    weight: float = 1.0  # share of training tokens (weights are normalized to sum to 1)
    text_key: str = ""  # "" = data.text_key


@dataclass
class DataConfig:
    path: Any = "data/shakespeare.jsonl.gz"  # .jsonl/.jsonl.gz/.parquet file, folder of them (mixed), glob, or [list, of, these]; one {"text": ...} per line or a text column
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture, e.g. [{name: web, path: a/, weight: 0.75}, ...]; replaces data.path; [] = data.path alone
    text_key: str = "text"  # JSON field or parquet column holding the document text
    tokenizer: str = "data/tokenizer"  # folder loadable by AutoTokenizer.from_pretrained
    seq_len: int = 256  # tokens per training sequence (the model sees seq_len, predicts seq_len)
    packing: bool = True  # true: join documents with EOS into full windows; false: one padded document per row
    val_fraction: float = 0.05  # share of documents held out for validation (a fixed split, whatever the seed)
    test_fraction: float = 0.05  # share held out for the test loss at the end, which no selection reads; 0 = no test split
    skip_bad_lines: bool = False  # skip malformed JSON lines (and count them) instead of stopping
    cache_dir: str = "results/cache"  # where tokenized corpora are cached, keyed by data + tokenizer digest
    workers: int = 0  # processes tokenizing the corpus into the cache; 0 = one per CPU core


@dataclass
class ModelConfig:
    """The model's shape, under the names of `MiniMindConfig` (and transformers' `LlamaConfig`): one name per setting."""

    vocab_size: int = 6400  # must be >= the tokenizer's vocabulary
    hidden_size: int = 512  # width of the residual stream
    num_hidden_layers: int = 8  # transformer blocks
    num_attention_heads: int = 8  # query heads; must divide hidden_size
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention); must divide num_attention_heads
    intermediate_size: int = 0  # SwiGLU width; 0 = 8/3 * hidden_size rounded up to a multiple of 64
    max_position_embeddings: int = 32768  # longest sequence RoPE is set up for
    rope_theta: float = 1e6  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    dropout: float = 0.0  # dropout on attention and residual branches
    tie_word_embeddings: bool = True  # share the input embedding with the output head
    parametrization: str = "sp"  # sp: standard | mup: μP, so that lr and init tuned at model.base_width transfer to other widths (docs/mup.md)
    base_width: int = 0  # μP: the hidden_size the hyperparameters were tuned at; 0 = hidden_size (μP then equals SP)
    mup_input_mult: float = 1.0  # μP: multiplier of the input embedding's output
    mup_output_mult: float = 1.0  # μP: multiplier of the logits, on top of base_width / hidden_size


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch, PER RANK: tokens per step = batch_size * seq_len * grad_accum * ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 50  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.1  # AdamW weight decay (not applied to norms and biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    adamw: str = "fused"  # fused | foreach: AdamW as one fused kernel (3-9x faster on a CPU) or torch's foreach loop (CPU runs logged before train.adamw existed); CUDA always fuses
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware runs it fast, else fp32)
    max_skipped_steps: int = 20  # fp16: stop after this many steps in a row skipped for overflowing gradients; 0 = never
    compile: str = "auto"  # torch.compile the forward/backward: auto | true | false (auto: on CUDA, and on CPU for models of 10M+ parameters)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 20  # validation batches per pass
    test_batches: int = 100  # test batches evaluated once at the end (the first ones: a fixed set); 0 = the whole test split
    log_every: int = 10  # steps between progress updates and metric flushes
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # checkpoints kept per run
    checkpoint_dir: str = ""  # "" = results/checkpoints/<run id> (set by the runner)
    resume_from: str = ""  # checkpoint file to continue from (set by `run.py resume=<run_id>`)
    sample_tokens: int = 120  # tokens generated per sample at the end; 0 = no samples
    samples: list[str] = field(default_factory=lambda: ["ROMEO:", "To be, or not", "KING HENRY:"])  # prompts


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow
    uri: str = ""  # tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db
    experiment: str = ""  # MLflow experiment name; "" = the named experiment (exp=...)
    run_name: str = ""  # MLflow run name; "" = MLflow picks one
    log_hf_model: bool = True  # also log the final model as Llama in MLflow's transformers flavor (runs:/<id>/llama)


@dataclass
class SweepConfig:
    """How a study runs; what it searches is the recipe's SEARCH_SPACE (research/search_space.py), and its stages are in research/study_plan.py."""

    n_trials: int = 0  # trials of the search (the default's included; confirm and evaluate trials come on top); 0 = a single training run, no study
    sampler: str = "tpe"  # tpe: Optuna's TPE over the search space | grid: every combination of the space's grid values at sweep.grid_seeds seeds
    enqueue_default: bool = True  # the recipe's own values are the first trial, the search's reference
    confirm_top_k: int = 2  # the k best searched configurations train again at new seeds, where the answer is chosen
    confirm_seeds: int = 2  # new seeds (seed+1, ...) per confirmed configuration; 0 = choose on the search seed alone
    choose_by: str = "worst"  # worst | mean_plus_sd | mean: how the confirmed configurations are ranked (lower is better)
    eval_seeds: int = 3  # the answer and the default train at these further seeds (seed+1000, ...): the report's figures, on test loss; 0 = none
    grid_seeds: int = 1  # sampler=grid: seeds per grid point (seed, seed+1, ...)
    study_name: str = ""  # "" = <experiment>-sweep
    storage: str = ""  # Optuna storage URL (sqlite, postgresql, mysql) or journal:PATH / PATH.journal; "" = sqlite:///<out_dir>/optuna.db
    pruner: str = "hyperband"  # hyperband | median | none (only search trials are pruned)
    prune_after_steps: int = 0  # no trial is stopped before this step (hyperband min_resource, median warmup); 0 = train.eval_every
    prune_after_trials: int = 3  # median pruner: trials that must finish before it stops any
    heartbeat_s: int = 30  # a running trial marks itself alive this often
    grace_s: int = 300  # a running trial silent this long belongs to a dead worker: it is failed and queued again
    max_retries: int = 2  # times a dead worker's trial is queued again before it stays failed
    objective: str = "loss"  # loss | bpb: the validation metric trials are pruned, ranked and chosen on, and the test metric of the evaluation stage
    report_dir: str = ""  # also write the study's report (summary.md, summary.html, plots) here, e.g. results/lr_sweep-sweep; "" = only <out_dir>/sweeps/<study>/ and the parent run


# sweep keys of earlier versions: the search space is now the recipe's SEARCH_SPACE; logged configs that have them still load
RETIRED_SWEEP_KEYS = ("lr_min", "lr_max", "warmup_min", "warmup_max", "min_lr_ratio_min", "min_lr_ratio_max", "grid_lr", "grid_min_lr_ratio")


@dataclass
class ScalingConfig:
    """exp=scaling (research/scaling.py): model shapes x compute budgets, a fitted law, and a held-out budget predicted before it is trained."""

    sizes: list[str] = field(default_factory=list)  # model shapes WIDTHxDEPTH, e.g. 128x4 (head dim 16, kv heads about half the query heads)
    budgets: list[float] = field(default_factory=list)  # training FLOPs of the fitted cells: each size trains budget / FLOPs per token tokens
    seeds: int = 1  # seeds per fitted cell (seed, seed+1, ...)
    holdout_factor: float = 4.0  # the held-out budget is this many times the largest fitted one (at least 4)
    holdout_sizes: list[str] = field(default_factory=list)  # shapes beyond sizes that the held-out run may pick as its compute-optimal size
    holdout_seeds: int = 1  # seeds of the held-out run; its actual loss is their mean
    lr_width: int = 192  # the lr rule: train.lr at this width, train.lr * sqrt(lr_width / width) at another
    warmup_share: float = 0.05  # warmup steps as a share of each cell's steps
    max_epochs: float = 4.0  # no run may repeat the training split more often than this
    bootstrap: int = 200  # bootstrap resamples of the cells behind every interval


@dataclass
class BenchConfig:
    steps: int = 5  # measured steps per candidate; medians are reported
    warmup_steps: int = 2  # steps per candidate run first and not counted (allocation, compilation)
    padded: bool = True  # also time our step with data.packing=false
    llama: bool = True  # also time transformers' LlamaForCausalLM: plain (eager, torch's AdamW) and tuned (torch.compile, fused AdamW), the references of the ratios
    compile: bool = True  # also time our step with train.compile switched the other way
    plain_phase: bool = True  # CPU: first time ours and plain Llama in a fresh process with glibc's allocator and libgomp's OpenMP defaults
    load: list[str] = field(default_factory=lambda: ["spinners", "training"])  # CPU: time our step and the Llamas again beside each load: spinners (one busy process per core), training (a second run of the same shape); [] = alone only
    profile: bool = True  # add a torch.profiler breakdown of one step of ours (each compile setting) to the report
    out: str = "results/bench"  # folder of the report
    machine: str = ""  # report file name (without .md); "" = the device name and thread count
    data_mb: int = 1000  # exp=bench_data: MB of JSONL in the generated corpus
    data_shards: int = 20  # exp=bench_data: gzip shards it is written as
    data_reference: bool = True  # exp=bench_data: also time a one-thread tokenizer(batch) pass (as slow as a one-worker build)
    data_formats: list[str] = field(default_factory=lambda: ["jsonl", "parquet"])  # exp=bench_data: the same documents as gzip JSONL shards and/or parquet shards


@dataclass
class Config:
    exp: str = "baseline"  # named experiment in experiments/ (set by run.py)
    seed: int = 1337  # seeds model init, data order and sampling
    out_dir: str = "results"  # where runs write (stores, caches, checkpoints)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. 'train.lr'."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for name in node:
        value = node[name]
        if isinstance(value, DictConfig):
            keys += valid_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_message(key: str) -> str:
    if key.startswith("sweep.") and key.removeprefix("sweep.") in RETIRED_SWEEP_KEYS:
        return (f"'{key}' is gone: a sweep searches its recipe's SEARCH_SPACE; copy experiments/lr_sweep.py under a new name "
                "and change the bounds there (research/search_space.py)")
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else ""
    section = key.split(".")[0]
    siblings = [k for k in keys if k.startswith(section + ".")]
    listing = f"valid keys under '{section}': {', '.join(siblings)}" if siblings else f"valid sections: {', '.join(sorted({k.split('.')[0] for k in keys}))}"
    return f"unknown config key '{key}'; {hint + ' ' if hint else ''}{listing}"


def apply_overrides(cfg: DictConfig, overrides: dict[str, Any] | list[str]) -> DictConfig:
    """Apply `key=value` strings or a {key: value} dict, turning OmegaConf errors into one-line UserErrors."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    keys = set(valid_keys())  # built once: each call builds the whole schema
    for key, value in items:
        if key not in keys:
            raise UserError(_unknown_key_message(key))
        try:
            if isinstance(value, str):  # parsed as YAML ('3e-4', 'true', '[a, b]'); an empty value is the empty string, not null
                value = OmegaConf.to_container(OmegaConf.from_dotlist([f"x={value}"]))["x"] if value else ""
            # a list replaces the old one whole; merging it lets a list of dicts become data.sources' SourceConfigs
            OmegaConf.update(cfg, key, value, merge=isinstance(value, (list, ListConfig)))
        except (ValidationError, ConfigKeyError, ConfigAttributeError, OmegaConfBaseException) as err:
            expected = type(OmegaConf.select(OmegaConf.structured(Config), key)).__name__
            raise UserError(f"bad value for '{key}': {value!r} is not a valid {expected} ({str(err).splitlines()[0]})") from None
    return cfg


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise UserError(f"expected key=value, got '{override}' (e.g. train.lr=3e-4); see `python run.py --help`")
    key, value = override.split("=", 1)
    return key.strip(), value


def make_config(overrides: dict[str, Any] | list[str] = ()) -> DictConfig:
    """The defaults plus overrides, as an OmegaConf structured config typed by `Config`; not yet validated."""
    return apply_overrides(OmegaConf.structured(Config), overrides)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


# model keys as runs logged them before the model section took MiniMindConfig's (Llama's) names
RENAMED_MODEL_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                      "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}


def from_yaml(text: str) -> DictConfig:
    """Load a logged config back onto the schema, so types and unknown keys are checked again; a config logged by an
    older version gets what that version ran (old model key names renamed, train.adamw=foreach), so it reproduces exactly."""
    cfg = OmegaConf.structured(Config)
    try:
        loaded = OmegaConf.to_container(OmegaConf.create(text))
        model = loaded.get("model", {})
        loaded["model"] = {RENAMED_MODEL_KEYS.get(key, key): value for key, value in model.items()}
        loaded.setdefault("train", {}).setdefault("adamw", "foreach")  # what runs logged before the key trained with
        loaded.setdefault("data", {}).setdefault("test_fraction", 0.0)  # ... and they had no test split: train on what they trained on
        for key in RETIRED_SWEEP_KEYS:  # a study's bounds, now the recipe's SEARCH_SPACE: nothing a run trains with
            loaded.get("sweep", {}).pop(key, None)
        (loaded.get("bench") or {}).pop("default_allocator_first", None)  # a benchmark key that bench.plain_phase replaced; no run trained with it
        return OmegaConf.merge(cfg, loaded)
    except OmegaConfBaseException as err:
        raise UserError(f"logged config does not fit this version's schema: {str(err).splitlines()[0]}") from None


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """{'train.lr': 0.001, ...}: how the config is logged as MLflow params."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(container, "")
    return flat


def resolve_path(path: str) -> Path:
    """Relative paths are taken from the current folder when they exist there, else from the repo root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    return (REPO_ROOT / candidate).resolve()


def validate(cfg: DictConfig) -> None:
    """Catch impossible settings before any work starts."""
    t, m, d = cfg.train, cfg.model, cfg.data  # the model's own shape is checked by model.model_config
    checks = [
        (t.max_steps > 0, f"train.max_steps must be > 0, got {t.max_steps}"),
        (t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}"),
        (t.grad_accum > 0, f"train.grad_accum must be > 0, got {t.grad_accum}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (0 <= t.warmup_steps <= t.max_steps, f"train.warmup_steps must be in [0, train.max_steps={t.max_steps}], got {t.warmup_steps}"),
        (0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"),
        (str(t.compile).lower() in ("auto", "true", "false"), f"train.compile must be auto, true or false, got '{t.compile}'"),
        (t.adamw in ("fused", "foreach"), f"train.adamw must be fused or foreach, got '{t.adamw}'"),
        (t.precision in ("auto", "fp32", "bf16", "fp16"), f"train.precision must be auto, fp32, bf16 or fp16, got '{t.precision}'"),
        (t.eval_every >= 0 and t.log_every > 0, "train.eval_every must be >= 0 and train.log_every > 0"),
        (t.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0 (0 = never stop), got {t.max_skipped_steps}"),
        (d.seq_len > 1, f"data.seq_len must be > 1, got {d.seq_len}"),
        (d.seq_len <= m.max_position_embeddings,
         f"data.seq_len ({d.seq_len}) exceeds model.max_position_embeddings ({m.max_position_embeddings}); lower data.seq_len or raise the model maximum"),
        (0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}"),
        (0.0 <= d.test_fraction and d.val_fraction + d.test_fraction < 1.0,
         f"data.test_fraction must be >= 0 and leave documents to train on (val + test < 1), got {d.test_fraction} with data.val_fraction={d.val_fraction}"),
        (t.test_batches >= 0, f"train.test_batches must be >= 0 (0 = the whole test split), got {t.test_batches}"),
        (d.workers >= 0, f"data.workers must be >= 0 (0 = one per CPU core), got {d.workers}"),
        (isinstance(d.path, str) or (isinstance(d.path, Sequence) and all(isinstance(p, str) for p in d.path)),
         f"data.path must be a path, a glob or a list of them, got {d.path!r}"),
        (cfg.bench.steps > 0 and cfg.bench.warmup_steps >= 0, "bench.steps must be > 0 and bench.warmup_steps >= 0"),
        (len(cfg.bench.data_formats) > 0 and all(f in ("jsonl", "parquet") for f in cfg.bench.data_formats),
         f"bench.data_formats takes jsonl and/or parquet, got {list(cfg.bench.data_formats)}"),
        (all(kind in ("spinners", "training") for kind in cfg.bench.load), f"bench.load takes spinners and/or training, got {list(cfg.bench.load)}"),
        (cfg.sweep.objective in ("loss", "bpb"), f"sweep.objective must be loss or bpb, got '{cfg.sweep.objective}'"),
        (cfg.sweep.pruner in ("hyperband", "median", "none"), f"sweep.pruner must be hyperband, median or none, got '{cfg.sweep.pruner}'"),
        (cfg.sweep.sampler in ("tpe", "grid"), f"sweep.sampler must be tpe or grid, got '{cfg.sweep.sampler}'"),
        (cfg.sweep.choose_by in ("worst", "mean_plus_sd", "mean"), f"sweep.choose_by must be worst, mean_plus_sd or mean, got '{cfg.sweep.choose_by}'"),
        (min(cfg.sweep.confirm_top_k, cfg.sweep.confirm_seeds, cfg.sweep.eval_seeds, cfg.sweep.prune_after_steps, cfg.sweep.prune_after_trials) >= 0
         and cfg.sweep.grid_seeds > 0, "sweep.confirm_top_k, confirm_seeds, eval_seeds, prune_after_steps and prune_after_trials must be >= 0, and sweep.grid_seeds > 0"),
        (0 < cfg.sweep.heartbeat_s < cfg.sweep.grace_s and cfg.sweep.max_retries >= 0,
         f"need 0 < sweep.heartbeat_s < sweep.grace_s and sweep.max_retries >= 0, got {cfg.sweep.heartbeat_s}, {cfg.sweep.grace_s}, {cfg.sweep.max_retries}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    validate_sources(d.sources)
    if t.precision == "fp16":
        import torch

        if t.device == "cpu" or not torch.cuda.is_available():
            raise UserError("train.precision=fp16 needs a CUDA device (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")


SOURCE_HINT = "e.g. data.sources='[{name: web, path: data/web/, weight: 0.75}, {name: books, path: books.jsonl, weight: 0.25}]'"


def validate_sources(sources: Sequence) -> None:
    """Each source of a mixture has a metric-safe name of its own, a path and a positive weight."""
    names = [s.name for s in sources]
    for source in sources:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", source.name or ""):
            raise UserError(f"data.sources: name {source.name!r} must be letters, digits, '-', '_' or '.' (it names the metrics val/loss/<name>); {SOURCE_HINT}")
        if not source.path:
            raise UserError(f"data.sources: source '{source.name}' has no path; {SOURCE_HINT}")
        if not source.weight > 0:
            raise UserError(f"data.sources: source '{source.name}' has weight {source.weight}; weights must be > 0; {SOURCE_HINT}")
    if len(set(names)) < len(names):
        raise UserError(f"data.sources: names must differ, got {names}; {SOURCE_HINT}")
