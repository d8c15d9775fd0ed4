"""research.model and research.export on tiny models (hidden 32, 2 layers): fast on CPU, fp32 throughout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaForCausalLM, PreTrainedTokenizerFast

from research.config import ModelConfig
from research.errors import UserError
from research.export import export_llama, to_llama_config
from research.accounting import flops_per_token, num_params
from research.model import MiniMindConfig, MiniMindForCausalLM, attention_mask_for, model_config

TEXT = b"ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def tiny_config(**overrides) -> MiniMindConfig:
    kwargs = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rope_theta=10000.0)
    kwargs.update(overrides)
    return MiniMindConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every weight away from its init (norms are all ones at init, which would hide a swapped name)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def tokens(batch: int = 2, seq: int = 8, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


def test_default_config_and_auto_intermediate_size():
    c = MiniMindConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (6400, 512, 8, 8, 2)
    assert c.intermediate_size == 1408  # 512 * 8/3 = 1365.3 -> next multiple of 64
    assert c.model_type == "minimind" and c.tie_word_embeddings and c.dropout == 0.0
    assert MiniMindConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).intermediate_size == 192


def test_config_from_experiment_section():
    section = OmegaConf.structured(ModelConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                               rms_norm_eps=1e-6, tie_word_embeddings=False, dropout=0.1))
    c = model_config(section, bos_token_id=5, eos_token_id=6, pad_token_id=7)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 3, 4, 1)
    assert c.intermediate_size == 192 and c.rms_norm_eps == 1e-6 and c.rope_theta == 1e6 and c.dropout == 0.1
    assert not c.tie_word_embeddings and (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (5, 6, 7)
    assert model_config(OmegaConf.structured(ModelConfig(intermediate_size=100))).intermediate_size == 100


def test_config_rejects_bad_head_counts():
    with pytest.raises(Exception, match="must divide"):
        tiny_config(num_key_value_heads=3)


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_names():
    model = tiny_model()
    out = model(tokens(3, 10))
    assert out.logits.shape == (3, 10, 100) and out.loss is None and out.cache is None
    assert model(tokens(3, 10), logits_to_keep=1).logits.shape == (3, 1, 100)
    names = set(model.state_dict())
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            assert f"model.layers.{i}.{part}.weight" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert not any(n.endswith(".bias") for n in names)
    assert len(names) == 2 * 9 + 3  # nothing else: no buffers, no biases


def test_tied_weights_are_one_tensor():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 0] = 123.0
    assert model.lm_head.weight[3, 0].item() == 123.0
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert num_params(untied) - num_params(model) == 100 * 32


def test_init_scales_residual_projections():
    model = MiniMindForCausalLM(tiny_config(hidden_size=64, num_hidden_layers=8, vocab_size=2000))
    q_std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = torch.cat([layer.self_attn.o_proj.weight.flatten() for layer in model.model.layers]).std().item()
    assert abs(q_std - 0.02) < 0.002 and abs(o_std - 0.02 / 4) < 0.0005  # 1/sqrt(2 * 8 layers) = 1/4
    assert all((layer.input_layernorm.weight == 1).all() for layer in model.model.layers)


def test_gqa_matches_mha_with_repeated_kv_heads():
    """Query head h must use K/V head h // (heads / kv_heads): an MHA copy with each K/V head repeated agrees."""
    gqa = tiny_model(num_attention_heads=4, num_key_value_heads=2)
    perturb(gqa)
    assert gqa.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)
    mha = tiny_model(num_attention_heads=4, num_key_value_heads=4)
    state = gqa.state_dict()
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state, strict=True)
    x = tokens(2, 12)
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    x = tokens(1, 12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 100
    torch.testing.assert_close(model(x).logits[:, :8], model(y).logits[:, :8])
    assert not torch.allclose(model(x).logits[:, 8:], model(y).logits[:, 8:])


def test_loss_is_masked_cross_entropy_at_the_same_positions():
    model = tiny_model()
    perturb(model)
    x = tokens(2, 6)
    labels = tokens(2, 6, seed=1)
    labels[0, :2] = -100
    labels[1, 5] = -100
    out = model(x, labels=labels)
    logp = F.log_softmax(out.logits.double(), dim=-1)
    picked = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(6) if labels[b, t] != -100]
    expected = torch.stack(picked).mean()
    assert len(picked) == 9
    assert abs(out.loss.item() - expected.item()) < 1e-5


def test_padding_mask_left_and_right():
    """Real tokens get the same logits whether or not the row is padded (left padding needs position_ids)."""
    model = tiny_model()
    perturb(model)
    x = tokens(1, 6)
    alone = model(x).logits[0]
    pad = torch.zeros(1, 3, dtype=torch.long)
    ones, zeros = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)

    right = model(torch.cat([x, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits[0, :6]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)

    mask = torch.cat([zeros, ones], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    left = model(torch.cat([pad, x], 1), attention_mask=mask, position_ids=positions).logits[0]
    torch.testing.assert_close(left[3:], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(left).all()


def test_padded_query_rows_are_never_fully_masked():
    """A left-padding query still sees itself: an all-masked row would give NaN on some SDPA kernels."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    attn, is_causal = attention_mask_for(mask, batch=2, q_len=4, past_len=0, device="cpu")
    assert not is_causal and attn.shape == (2, 1, 4, 4) and attn.any(-1).all()
    assert attn[0, 0, 3].tolist() == [False, False, True, True] and attn[1, 0].tril().equal(attn[1, 0])
    assert attention_mask_for(torch.ones(2, 4), 2, 4, 0, "cpu") == (None, True)  # no padding: SDPA's causal path
    assert attention_mask_for(None, 2, 1, 6, "cpu") == (None, False)  # one cached step sees everything


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    x = tokens(1, 8)
    torch.testing.assert_close(model(x).logits, model(x).logits)
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)


# ----------------------------------------------------------------------------- cache and generation


def test_cached_forward_matches_full_forward():
    model = tiny_model()
    perturb(model)
    x = tokens(2, 10)
    full = model(x).logits
    cache = DynamicCache(config=model.config)
    first = model(x[:, :5], cache=cache, use_cache=True)
    assert first.cache is cache and cache.get_seq_length() == 5
    chunk = model(x[:, 5:8], cache=cache, use_cache=True).logits  # several new tokens on top of a cache
    step = model(x[:, 8:9], past_key_values=cache, use_cache=True).logits  # pre-5.x keyword still works
    torch.testing.assert_close(torch.cat([first.logits, chunk, step], 1), full[:, :9], atol=1e-5, rtol=1e-5)


def test_greedy_generate_cache_equals_no_cache_equals_manual_loop():
    model = tiny_model(eos_token_id=None)
    perturb(model)
    x = tokens(2, 5)
    cached = model.generate(x, max_new_tokens=8, do_sample=False)
    uncached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    manual = x
    with torch.no_grad():
        for _ in range(8):
            manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached) and torch.equal(cached, manual)


def test_generate_left_padded_batch_matches_single_prompts():
    model = tiny_model(eos_token_id=None)
    perturb(model)
    long, short = tokens(1, 7, seed=3), tokens(1, 4, seed=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[0], model.generate(long, max_new_tokens=6, do_sample=False)[0])
    assert torch.equal(together[1, 3:], model.generate(short, max_new_tokens=6, do_sample=False)[0])


def test_sampling_is_seeded_and_in_vocab():
    model = tiny_model(eos_token_id=None)
    x = tokens(2, 4)
    torch.manual_seed(7)
    a = model.generate(x, max_new_tokens=10, do_sample=True, top_k=5, temperature=0.8)
    torch.manual_seed(7)
    b = model.generate(x, max_new_tokens=10, do_sample=True, top_k=5, temperature=0.8)
    assert a.shape == (2, 14) and torch.equal(a, b) and int(a.max()) < 100


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_from_pretrained_round_trip(tmp_path, tie):
    model = tiny_model(tie_word_embeddings=tie)
    perturb(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "minimind"
    assert (tmp_path / "model.safetensors").exists()
    x = tokens(2, 9)
    for loaded in (MiniMindForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded) is MiniMindForCausalLM
        loaded.eval()
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert torch.equal(loaded(x).logits, model(x).logits)


# ----------------------------------------------------------------------------- accounting


def test_num_params_and_flops_by_hand():
    # vocab 100, hidden 32, 2 layers, 4 heads of 8, 2 KV heads, SwiGLU width 128.
    per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 128 + 2 * 32  # q, k, v, o, MLP, 2 norms = 15424
    body = 2 * per_layer + 32  # + final norm = 30880
    assert body == 30880
    model = tiny_model()
    assert num_params(model, non_embedding=True) == body
    assert num_params(model) == body + 100 * 32 == sum(p.numel() for p in model.parameters())
    untied = tiny_model(tie_word_embeddings=False)
    assert num_params(untied) == body + 2 * 100 * 32 and num_params(untied, non_embedding=True) == body
    # 6 * (body + head) + 12 * layers * heads * head_dim * seq
    assert flops_per_token(model.config, 16) == 6 * 34080 + 12 * 2 * 4 * 8 * 16 == 216768
    assert flops_per_token(untied.config, 16) == flops_per_token(model.config, 16)


# ----------------------------------------------------------------------------- export to Llama


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("tie", [True, False])
def test_export_llama_matches_logits(tmp_path, tie):
    model = tiny_model(vocab_size=256, tie_word_embeddings=tie, eos_token_id=None)
    perturb(model)
    out = export_llama(model, tmp_path / "llama", tokenizer=tiny_tokenizer())
    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == [4, 5]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]

    llama = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code, no research import needed
    assert type(llama) is LlamaForCausalLM
    llama.eval()
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tie
    ours, theirs = model.state_dict(), llama.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    text = torch.tensor(list(TEXT), dtype=torch.long)  # bytes of a real sentence as token ids
    batch = torch.stack([text[:40], text[40:80]])
    with torch.no_grad():
        diff = (llama(batch).logits - model(batch).logits).abs().max().item()
    assert diff < 1e-4

    # with padding and a cache, through generate
    mask = torch.ones_like(batch)
    batch[1, :5], mask[1, :5] = 0, 0
    ours_gen = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    theirs_gen = llama.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours_gen, theirs_gen)


def test_to_llama_config_maps_fields():
    c = to_llama_config(tiny_config(rms_norm_eps=1e-6, dropout=0.1))
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (32, 128, 2, 4, 2)
    assert c.head_dim == 8 and c.rms_norm_eps == 1e-6 and c.rope_parameters["rope_theta"] == 10000.0
    assert c.rope_parameters["rope_type"] == "default" and c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias


def test_export_refuses_unmappable_config(tmp_path):
    with pytest.raises(UserError, match="sliding_window"):
        to_llama_config(tiny_config(sliding_window=8))
    model = tiny_model()
    model.config.hidden_act = "gelu"
    with pytest.raises(UserError, match="hidden_act"):
        export_llama(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()
