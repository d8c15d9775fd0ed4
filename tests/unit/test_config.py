"""Configs logged by older versions load onto today's schema and mean what they meant then."""

import torch

from research.config import from_yaml, make_config, to_yaml
from research.step import build_optimizer


OLD_RUN = """
seed: 7
model:
  num_layers: 3
  num_heads: 4
  num_kv_heads: 2
  norm_eps: 1.0e-06
  tie_embeddings: false
train:
  lr: 0.002
sweep:
  n_trials: 0
  lr_min: 0.0001
  grid_lr: [0.001, 0.003]
bench:
  default_allocator_first: true
"""


def test_an_older_runs_config_keeps_its_meaning():
    cfg = from_yaml(OLD_RUN)
    assert (cfg.model.num_hidden_layers, cfg.model.num_attention_heads, cfg.model.num_key_value_heads) == (3, 4, 2)
    assert cfg.model.rms_norm_eps == 1e-6 and cfg.model.tie_word_embeddings is False and cfg.train.lr == 0.002
    assert cfg.train.adamw == "foreach"  # what it trained with: reproducing it takes the same optimizer path
    assert cfg.data.test_fraction == 0.0  # no test split then: it trains on the documents it trained on
    assert "lr_min" not in cfg.sweep and "grid_lr" not in cfg.sweep  # a study's bounds are the recipe's SEARCH_SPACE now
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, cfg.train, torch.device("cpu")).defaults["foreach"] is True


def test_a_new_config_round_trips():
    cfg = make_config(["train.lr=0.003"])
    assert cfg.train.adamw == "fused" and cfg.data.test_fraction == 0.05
    again = from_yaml(to_yaml(cfg))
    assert again == cfg
    assert build_optimizer(torch.nn.Linear(4, 4), again.train, torch.device("cpu")).defaults["fused"] is True
