"""Entry point: `python run.py exp=NAME key=value ...`.

    python run.py                                  # the baseline experiment
    python run.py exp=baseline train.max_steps=50  # any key of research/config.py
    python run.py list                             # experiments and what they do
    python run.py keys                             # every config key with its default
    python run.py ui                               # MLflow UI on the results store
    python run.py resume=<run_id>                  # continue a stopped run from its newest checkpoint
    python run.py reproduce=<run_id>               # train a logged run again and compare the curves
    python run.py export run_id=<id> out=<dir>     # a run's model as a Llama folder (AutoModelForCausalLM)
    python run.py sample run_id=<id> prompt="..."  # generate from a run's model [temperature= top_k= max_new_tokens= seed=]
    python run.py tokenizer data.path=<data> out=<dir>  # train a BPE tokenizer on a corpus sample [vocab_size= sample_bytes=]
    torchrun --nproc_per_node=N run.py exp=NAME    # data-parallel training (train.batch_size is per rank)

Bad input prints one line and exits with status 2 (add --debug for the traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one Rust thread per process: data.workers processes build the cache; `tokenizer` turns it on to train
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes, when a server is gone
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # ... or hangs (the default waits 120 s per try)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Writing model shards" bars between our own output
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a model hub


def usage() -> str:
    from research import registry

    lines = [__doc__.strip(), "", "experiments:"]
    width = max(len(n) for n in registry.names())
    lines += [f"  {name:<{width}}  {registry.description(name)}" for name in registry.names()]
    return "\n".join(lines)


def print_keys() -> None:
    from omegaconf import OmegaConf

    from research.config import Config, valid_keys

    defaults = OmegaConf.structured(Config)
    for key in valid_keys():
        print(f"{key} = {OmegaConf.select(defaults, key)}")


def open_ui(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from research.config import Config
    from research.tracking import artifact_root, tracking_uri

    cfg = OmegaConf.structured(Config)
    port = next((a.split("=", 1)[1] for a in args if a.startswith("port=")), "5000")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(cfg), "--port", port]
    if artifact_root(cfg):
        cmd += ["--default-artifact-root", artifact_root(cfg)]
    print(" ".join(cmd))
    return subprocess.call(cmd)


def train_tokenizer_command(args: list[str]) -> int:
    """`run.py tokenizer data.path=... out=DIR [vocab_size=6400] [sample_bytes=100000000]`: a tokenizer for your own corpus."""
    from research.artifacts import parse_command
    from research.data import TOKENIZER_SAMPLE_BYTES, train_tokenizer_on_corpus

    options = {"out": (str, ...), "vocab_size": (int, 6400), "sample_bytes": (int, TOKENIZER_SAMPLE_BYTES)}
    values, cfg = parse_command("tokenizer", args, options)
    d = cfg.data
    train_tokenizer_on_corpus(d.path, values["out"], values["vocab_size"], values["sample_bytes"], d.text_key, d.skip_bad_lines, d.workers)
    return 0


def main(argv: list[str]) -> int:
    from research import registry

    args = [a for a in argv if a != "--debug"]
    if any(a.startswith(("resume=", "reproduce=")) for a in args):
        from research.reproduce import main as reproduce_main

        return reproduce_main(args)
    if not args or args[0] not in ("list", "keys", "ui", "export", "sample", "tokenizer", "--help", "-h", "help"):
        exp = "baseline"
        overrides = []
        for arg in args:
            if arg.startswith("exp="):
                exp = arg.split("=", 1)[1]
            else:
                overrides.append(arg)
        cfg = registry.build(exp, overrides)
        from research.runner import run_experiment  # heavy imports (torch, mlflow) only once the config is valid

        run_experiment(cfg)
        return 0
    if args[0] == "keys":
        print_keys()
    elif args[0] == "ui":
        return open_ui(args[1:])
    elif args[0] == "export":
        from research.export import main as export_main

        return export_main(args[1:])
    elif args[0] == "sample":
        from research.sample import main as sample_main

        return sample_main(args[1:])
    elif args[0] == "tokenizer":
        return train_tokenizer_command(args[1:])
    else:
        print(usage())
    return 0


if __name__ == "__main__":
    from research.errors import UserError

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
