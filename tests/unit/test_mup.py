"""μP (research/mup.py) on tiny models: what it scales at width m x base, that it is SP at m = 1, and its export."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from research import mup
from research.config import TrainConfig
from research.errors import UserError
from research.export import to_llama
from research.model import MiniMindConfig, MiniMindForCausalLM, model_config
from research.step import build_optimizer


def model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    kwargs = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rope_theta=10000.0, initializer_range=0.02)
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**{**kwargs, **overrides})).eval()


def test_multipliers_at_four_times_the_base_width():
    c = model(parametrization="mup", base_width=16, mup_input_mult=2.0, mup_output_mult=3.0).config
    assert mup.width_mult(c) == 4.0 and mup.hidden_lr_scale(c) == 0.25
    assert mup.input_mult(c) == 2.0 and mup.output_mult(c) == 0.75
    assert math.isclose(mup.attention_scale(c), 1 / c.head_dim * math.sqrt(16 / 4))  # sqrt(base d_head) / d_head
    sp = model(base_width=16, mup_input_mult=2.0).config  # the μP keys do nothing under SP
    assert (mup.width_mult(sp), mup.attention_scale(sp), mup.input_mult(sp), mup.output_mult(sp)) == (1.0, None, 1.0, 1.0)
    base = model(parametrization="mup", base_width=64).config
    assert (mup.width_mult(base), mup.attention_scale(base), mup.output_mult(base)) == (1.0, None, 1.0)


def test_hidden_matrices_get_init_variance_and_adam_lr_over_m():
    sp, mu = model(), model(parametrization="mup", base_width=16)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        ratio = (mu.get_parameter(name).std() / sp.get_parameter(name).std()).item()
        assert ratio == pytest.approx(0.5, rel=0.05)  # sigma / sqrt(4)
    assert torch.equal(mu.model.embed_tokens.weight, sp.model.embed_tokens.weight)  # vector-like: drawn first, unscaled
    assert mu.lm_head.weight is mu.model.embed_tokens.weight

    train_cfg = OmegaConf.structured(TrainConfig(lr=1e-2))
    groups = build_optimizer(mu, train_cfg, torch.device("cpu")).param_groups
    assert [g.get("lr_scale", 1.0) for g in groups] == [0.25, 1.0, 1.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in mu.hidden_matrices()}
    assert len(groups[0]["params"]) == 2 * 7 and [p.dim() for p in groups[1]["params"]] == [2]  # 7 projections per block; the embedding
    assert len(build_optimizer(sp, train_cfg, torch.device("cpu")).param_groups) == 2


def test_logits_scale_with_the_output_multiplier():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mu = model(parametrization="mup", base_width=64, mup_output_mult=1.0)
    with torch.no_grad():
        at_base = mu(ids).logits
        mu.config.mup_output_mult = 0.5
        assert torch.allclose(mu(ids).logits, at_base * 0.5)


@pytest.mark.parametrize("tie", [True, False])
def test_export_folds_the_multipliers_into_llama_weights(tie):
    mu = model(parametrization="mup", base_width=16, mup_input_mult=3.0, mup_output_mult=2.0, tie_word_embeddings=tie)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from init, norms included, so that a weight folded into the wrong place shows
        for p in mu.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    llama = to_llama(mu)
    with torch.no_grad():
        ours, theirs = mu(ids).logits, llama(ids).logits
    assert ours.abs().max() > 0.1  # not a trivially small output
    assert (ours - theirs).abs().max().item() < 1e-5
    assert torch.equal(mu.lm_head.weight, mu.model.embed_tokens.weight) == tie  # ours is left as it was
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tie


def test_bad_mup_settings_are_one_line_user_errors():
    section = OmegaConf.create({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    for key, value, fragment in [("parametrization", "mu", "sp or mup"), ("base_width", 18, "multiple of num_attention_heads"),
                                 ("mup_output_mult", 0.0, "must be > 0")]:
        bad = OmegaConf.merge(section, {key: value})
        with pytest.raises(UserError, match=fragment) as err:
            model_config(bad)
        assert "\n" not in str(err.value)
