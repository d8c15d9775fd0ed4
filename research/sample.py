"""`python run.py sample run_id=<id> prompt="..."`: text from a logged run, printed as it is generated.

    python run.py sample run_id=<id> prompt="ROMEO:" temperature=0.8 top_k=50 max_new_tokens=200 seed=1

The model is the run's `model` artifact, loaded as trained; the same seed gives the same text.
Without seed= every call samples differently.
"""

from __future__ import annotations

import random

from transformers import TextStreamer

from research.artifacts import load_run_model, parse_command
from research.distributed import pick_device
from research.errors import UserError
from research.trainer import generate_samples

OPTIONS = {
    "run_id": (str, ...),
    "prompt": (str, ...),
    "temperature": (float, 0.8),  # softmax temperature; lower is more conservative
    "top_k": (int, 50),  # sample among the k most likely tokens; 0 = all
    "max_new_tokens": (int, 200),
    "seed": (int, None),
    "device": (str, "auto"),
}


def main(args: list[str]) -> int:
    options, cfg = parse_command("sample", args, OPTIONS)
    if options["temperature"] <= 0 or options["max_new_tokens"] <= 0 or options["top_k"] < 0:
        raise UserError("sample needs temperature > 0, max_new_tokens > 0 and top_k >= 0")
    model, tokenizer = load_run_model(cfg, options["run_id"])
    device = pick_device(options["device"])
    seed = options["seed"] if options["seed"] is not None else random.randrange(2**31)
    print(options["prompt"], end="", flush=True)
    generate_samples(
        model.to(device), tokenizer, [options["prompt"]], options["max_new_tokens"], seed, device,
        temperature=options["temperature"], top_k=options["top_k"],
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    return 0

