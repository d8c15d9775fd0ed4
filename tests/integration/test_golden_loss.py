"""Golden losses: the tiny config's per-step train losses (and its two val losses) at a fixed seed, committed in
tests/assets/losses/tiny.json, so that a change of numerics (model, init, optimizer, schedule, data order) fails here.

Regenerate the file, after a change of numerics that is meant, with:

    MINILM_UPDATE_GOLDEN=1 python -m pytest tests/integration/test_golden_loss.py

The tolerance comes from measurement (fp32, one thread): on one machine the losses repeat bit for bit; 1 vs 2
threads, torch's AVX-512 vs AVX2 vs plain kernels (ATEN_CPU_CAPABILITY, with MKL and oneDNN limited alike) and
fused vs foreach AdamW move them by at most 1.2e-7 relative. RTOL is 80 times that, and each of these edits
of the code fails the test: RMSNorm's eps x 1.1, the init std x 1.01, the warmup learning rate x 1.001.
"""

import json
import math
import os

import torch

from conftest import REPO, TINY
from research.hardware import device_name
from research.trainer import train

GOLDEN = REPO / "tests" / "assets" / "losses" / "tiny.json"
UPDATE = "MINILM_UPDATE_GOLDEN"
RTOL = 1e-5
SETTINGS = {**TINY, "train.threads": 1, "train.sample_tokens": 0, "tracking.enabled": False,
            "train.lr": 3e-3, "train.min_lr_ratio": 0.1, "data.test_fraction": 0.0}  # pinned: retuning the recipe is no change of numerics


def test_the_tiny_configs_losses_match_the_committed_ones(tiny_cfg):
    threads = torch.get_num_threads()
    try:  # the run sets torch to one thread; give the tests after it what they had
        result = train(tiny_cfg(**{key.replace(".", "__"): value for key, value in SETTINGS.items()}))
    finally:
        torch.set_num_threads(threads)
    got = {name: {str(step): loss for step, loss in result.curve(name)} for name in ("train/loss", "val/loss")}
    if os.environ.get(UPDATE):
        record = {"regenerate": f"{UPDATE}=1 python -m pytest tests/integration/test_golden_loss.py", "recipe": "baseline",
                  "settings": SETTINGS, "made_with": {"torch": torch.__version__, "cpu": device_name(torch.device("cpu"))}, **got}
        GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    hint = f"if the change of numerics is meant, regenerate {GOLDEN.relative_to(REPO)} with {UPDATE}=1"
    assert golden["settings"] == SETTINGS, f"the test's settings changed since the losses were recorded; {hint}"
    for name in ("train/loss", "val/loss"):
        assert golden[name].keys() == got[name].keys(), f"{name} logged at other steps; {hint}"
        off = [(step, want, got[name][step]) for step, want in golden[name].items() if not math.isclose(got[name][step], want, rel_tol=RTOL, abs_tol=0)]
        assert not off, f"{name} differs from the golden losses beyond rtol {RTOL} at (step, golden, now): {off}; {hint}"
