"""The project's one command line: `python run.py [COMMAND] [name=value ...]`.

    python run.py                                  # train the baseline experiment
    python run.py exp=NAME key=value ...           # train (or sweep) a named experiment; any key of `keys`
    python run.py list                             # experiments and what they do
    python run.py keys                             # every config key with its default
    python run.py ui [exp=NAME] [port=5000]        # MLflow UI on the results store (or the URL of a tracking server)
    python run.py sync                             # upload runs that lost their tracking server (results/offline)
    python run.py resume=<run_id>                  # continue a stopped run from its newest checkpoint
    python run.py reproduce=<run_id>               # train a logged run again and compare the curves [allow_data_change=true]
    python run.py compare A B [metric=test/loss]   # two sets of runs paired by seed: interval, verdict, differing keys [out=FILE.md]
    python run.py export run_id=<id> out=<dir>     # a run's model as a Llama folder (AutoModelForCausalLM)
    python run.py sample run_id=<id> prompt="..."  # generate from a run's model [temperature= top_k= max_new_tokens= seed= device=]
    python run.py tokenizer data.path=<data> out=<dir>  # train a BPE tokenizer on a corpus sample [vocab_size= sample_bytes= seed=]
    torchrun --nproc_per_node=N run.py exp=NAME    # data-parallel training (train.batch_size is per rank)

Every command takes name=value arguments: its own options (above) and config keys (tracking.uri=,
out_dir=, ...). Bad input prints one line and exits with status 2 (add --debug for the traceback).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one Rust thread per process: data.workers processes build the cache; `tokenizer` turns it on to train
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes, when a server is gone
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # ... or hangs (the default waits 120 s per try)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # its "View run" links open the GenAI view; we print classic ones
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Writing model shards" bars between our own output
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a model hub
if "OMP_WAIT_POLICY" not in os.environ:  # read once, when torch loads OpenMP: it must be set before the first import of torch
    # an idle OpenMP thread spins far less than GNU OpenMP's default before it sleeps: as fast alone, and when other
    # processes share the cores the spinning no longer steals their time (measured in results/bench/profile.md).
    # OMP_WAIT_POLICY=ACTIVE or GOMP_SPINCOUNT=... in the environment take precedence.
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

from research.config import make_config, valid_keys  # noqa: E402  (light: OmegaConf only)
from research.errors import UserError  # noqa: E402

REQUIRED = ...  # an option without a default


def parse(command: str, args: list[str], options: dict[str, tuple[type, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split `name=value` arguments into the command's typed options {name: (type, default)} and config overrides.

    The one parser of the project: a name that is neither an option nor a config key is refused with
    the closest matches.
    """
    values, overrides, keys = {}, {}, set(valid_keys())
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"expected key=value, got '{arg}' (e.g. train.lr=3e-4); see `python run.py --help`")
        name = name.strip()
        if name in options:
            values[name] = typed(name, value, options[name][0])
        elif name in keys or "." in name:
            overrides[name] = value  # the config checks the key and the type (with its own suggestions)
        else:
            close = difflib.get_close_matches(name, list(options) + sorted(keys), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise UserError(f"unknown option '{name}' for `run.py {command}`; {hint}options: {', '.join(options) or 'none'}, and config keys (python run.py keys)")
    for name, (_, default) in options.items():
        if name not in values:
            if default is REQUIRED:
                raise UserError(f"`run.py {command}` needs {name}=...; usage: python run.py {command} " + " ".join(f"{o}=..." for o in options))
            values[name] = default
    return values, overrides


def typed(name: str, value: str, kind: type) -> Any:
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise UserError(f"bad value for '{name}': {value!r} is not true or false")
        return value.lower() == "true"
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"bad value for '{name}': {value!r} is not a valid {kind.__name__}") from None


# ---- the commands: each parses its arguments, then calls the library ----


def train(args: list[str]) -> int:
    from research import registry

    options, overrides = parse("train", args, {"exp": (str, "baseline")})
    cfg = registry.build(options["exp"], overrides)
    from research.runner import run_experiment  # heavy imports (torch, mlflow) only once the config is valid

    run_experiment(cfg)
    return 0


def resume(args: list[str]) -> int:
    from research.reproduce import resume as resume_run

    options, overrides = parse("resume", args, {"resume": (str, REQUIRED)})
    return resume_run(run_id_of(options["resume"], "resume"), overrides)


def reproduce(args: list[str]) -> int:
    from research.reproduce import reproduce as reproduce_run

    options, overrides = parse("reproduce", args, {"reproduce": (str, REQUIRED), "allow_data_change": (bool, False)})
    return reproduce_run(run_id_of(options["reproduce"], "reproduce"), overrides, options["allow_data_change"])


def run_id_of(value: str, verb: str) -> str:
    if not value.strip():
        raise UserError(f"{verb}= needs a run id, e.g. {verb}=<32 hex digits> (python run.py ui lists runs)")
    return value.strip()


def export(args: list[str]) -> int:
    from research.artifacts import load_run_model
    from research.export import export_llama

    options, overrides = parse("export", args, {"run_id": (str, REQUIRED), "out": (str, REQUIRED)})
    out = Path(options["out"]).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={out} exists and is not an empty folder; choose a new folder or delete it")
    model, tokenizer = load_run_model(make_config(overrides), options["run_id"])
    export_llama(model, out, tokenizer)  # refuses (UserError) before writing anything
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported run {options['run_id']} as LlamaForCausalLM to {out} ({size / 1e6:.1f} MB); load with AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


SAMPLE_OPTIONS = {
    "run_id": (str, REQUIRED),
    "prompt": (str, REQUIRED),
    "temperature": (float, 0.8),  # softmax temperature; lower is more conservative
    "top_k": (int, 50),  # sample among the k most likely tokens; 0 = all
    "max_new_tokens": (int, 200),
    "seed": (int, -1),  # -1 = a different sample every call
    "device": (str, "auto"),
}


def sample(args: list[str]) -> int:
    import random

    from transformers import TextStreamer

    from research.artifacts import load_run_model
    from research.distributed import pick_device
    from research.sample import generate_samples

    o, overrides = parse("sample", args, SAMPLE_OPTIONS)
    if o["temperature"] <= 0 or o["max_new_tokens"] <= 0 or o["top_k"] < 0:
        raise UserError("sample needs temperature > 0, max_new_tokens > 0 and top_k >= 0")
    model, tokenizer = load_run_model(make_config(overrides), o["run_id"])
    device = pick_device(o["device"])
    seed = o["seed"] if o["seed"] >= 0 else random.randrange(2**31)
    print(o["prompt"], end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_samples(model.to(device), tokenizer, [o["prompt"]], o["max_new_tokens"], seed, device, o["temperature"], o["top_k"], streamer)
    return 0


def ui(args: list[str]) -> int:
    """`ui [port=5000] [host=127.0.0.1] [exp=NAME] [out_dir=... | tracking.uri=...]`: the MLflow UI on the runs' store."""
    from research.tracking_store import artifact_root, tracking_uri
    from research.ui import serve_ui

    options, overrides = parse("ui", args, {"port": (int, 5000), "host": (str, "127.0.0.1")})
    cfg = make_config(overrides)
    return serve_ui(tracking_uri(cfg), artifact_root(cfg), cfg.tracking.experiment or cfg.exp, options["host"], options["port"])


def list_experiments(args: list[str]) -> int:
    print(usage())
    return 0


def list_keys(args: list[str]) -> int:
    from omegaconf import OmegaConf

    defaults = make_config()
    for key in valid_keys():
        print(f"{key} = {OmegaConf.select(defaults, key)}")
    return 0


def usage() -> str:
    from research import registry

    lines = [__doc__.strip(), "", "experiments:"]
    width = max(len(n) for n in registry.names())
    lines += [f"  {name:<{width}}  {registry.description(name)}" for name in registry.names()]
    return "\n".join(lines)


def sync(args: list[str]) -> int:
    """`sync [out_dir=... | tracking.uri=...]`: upload the runs in <out_dir>/offline to the tracking store."""
    from research.offline import offline_dir
    from research.sync import sync_offline
    from research.tracking_store import artifact_root, connect, tracking_uri

    _, overrides = parse("sync", args, {})
    cfg = make_config(overrides)
    sync_offline(offline_dir(cfg.out_dir), connect(tracking_uri(cfg)), artifact_root(cfg))
    return 0


def compare(args: list[str]) -> int:
    """`compare A [B] [metric=test/loss] [out=FILE] [lower_is_better=true]`: A and B select runs (research/compare.py)."""
    import re

    from rich.console import Console

    from research.compare import compare as compare_runs
    from research.tracking_store import connect, tracking_uri

    selectors = [a for a in args if not re.match(r"^[\w.]+=", a)]  # a run id, id,id, an experiment[:filter]; not name=value
    if not 1 <= len(selectors) <= 2:
        raise UserError("usage: python run.py compare A B [metric=test/loss] [out=FILE.md]; A and B are run ids, id,id,..., "
                        "an experiment name[:MLflow filter], or one sweep parent run id alone")
    options, overrides = parse("compare", [a for a in args if a not in selectors],
                               {"metric": (str, "test/loss"), "out": (str, ""), "lower_is_better": (bool, True)})
    client = connect(tracking_uri(make_config(overrides)))
    compare_runs(client, selectors[0], selectors[1] if len(selectors) > 1 else None, options["metric"], options["lower_is_better"],
                 options["out"] or None, Console())
    return 0


def tokenizer(args: list[str]) -> int:
    """`tokenizer data.path=... out=DIR [vocab_size=6400] [sample_bytes=...] [seed=0]`: a tokenizer for your own corpus, on a random sample of it."""
    from research.data import TOKENIZER_SAMPLE_BYTES, train_tokenizer_on_corpus

    options, overrides = parse("tokenizer", args, {"out": (str, REQUIRED), "vocab_size": (int, 6400), "sample_bytes": (int, TOKENIZER_SAMPLE_BYTES),
                                                   "seed": (int, 0)})
    d = make_config(overrides).data
    train_tokenizer_on_corpus(d.path, options["out"], options["vocab_size"], options["sample_bytes"], d.text_key, d.skip_bad_lines, d.workers,
                              options["seed"])
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "list": list_experiments, "help": list_experiments, "--help": list_experiments, "-h": list_experiments,
    "keys": list_keys, "ui": ui, "sync": sync, "compare": compare, "export": export, "sample": sample, "tokenizer": tokenizer,
}


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--debug"]
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    verbs = [a.split("=", 1)[0] for a in args if a.startswith(("resume=", "reproduce="))]
    if len(verbs) > 1:
        raise UserError("give exactly one of resume=<run_id> or reproduce=<run_id>")
    if verbs:
        return resume(args) if verbs[0] == "resume" else reproduce(args)
    if args and "=" not in args[0] and "." not in args[0]:
        close = difflib.get_close_matches(args[0], [c for c in COMMANDS if not c.startswith("-")], n=1)
        raise UserError(f"unknown command '{args[0]}'; {f'did you mean {close[0]}? ' if close else ''}commands: {', '.join(c for c in COMMANDS if not c.startswith('-'))}, or name=value to train")
    return train(args)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as err:
        if "--debug" in sys.argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python run.py keys | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
