"""Bits per byte: each token's bytes, and bpb x bytes = loss x tokens / ln 2 on an evaluation, bytes counted from the raw text."""

import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from research.config import DataConfig
from research.corpus import iter_documents
from research.data import build_datasets, split_documents
from research.evaluate import eval_sums, evaluate_sets
from research.model import MiniMindConfig, MiniMindForCausalLM
from research.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer

TANG_SONG = Path(__file__).parents[1] / "data" / "tang_song.jsonl"
MIXED = ["ROMEO: But soft, what light", "床前明月光，疑是地上霜。", "naïve café — 🍣 done\n\n  spaces", "a"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("data/tokenizer")


def test_token_bytes_add_up_to_the_texts_bytes(tokenizer, tmp_path):
    small = train_tokenizer(list(iter_documents(TANG_SONG)) * 2, tmp_path / "small", vocab_size=300)  # splits Chinese characters across tokens
    for tok in (tokenizer, small):
        lengths = token_byte_lengths(tok)
        assert len(lengths) == len(tok) and [lengths[i] for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)] == [0, 0, 0]
        for text in MIXED:
            assert sum(lengths[i] for i in tok(text, add_special_tokens=False)["input_ids"]) == len(text.encode("utf-8"))


def test_bpb_times_bytes_is_loss_times_tokens_over_ln2(tokenizer, tmp_path):
    """One padded row per document (none truncated), so the targets of a row are the document's tokens and its eos: their
    bytes are the document's UTF-8 bytes, read from the corpus itself."""
    cfg = DataConfig(path=str(TANG_SONG), cache_dir=str(tmp_path), packing=False, seq_len=1024, val_fraction=0.2, test_fraction=0.0)
    _, val, _, info = build_datasets(cfg, tokenizer)
    docs = list(iter_documents(TANG_SONG))
    _, val_ids, _ = split_documents(len(docs), 0.2, 0.0)
    batches, batch_size = 2, 4
    evaluated = [docs[d] for d in val_ids[:batches * batch_size]]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in evaluated]
    assert max(len(i) for i in ids) + 2 <= cfg.seq_len + 1  # no document truncated
    n_bytes, n_tokens = sum(len(t.encode("utf-8")) for t in evaluated), sum(len(i) + 1 for i in ids)

    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, max_position_embeddings=2048))
    train_cfg = SimpleNamespace(eval_batches=batches, batch_size=batch_size)
    token_bytes = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float32)
    metrics = evaluate_sets(model, {"": val}, "val", train_cfg, torch.device("cpu"), nullcontext, None, token_bytes)
    total, count, _ = eval_sums(model, val, train_cfg, torch.device("cpu"), nullcontext).float()
    loss = (total / count).item()  # the float32 ratio runs logged before bpb existed
    assert metrics["val/loss"] == loss and set(metrics) == {"val/loss", "val/bpb"}
    assert eval_sums(model, val, train_cfg, torch.device("cpu"), nullcontext, None, None, token_bytes)[1:].tolist() == [n_tokens, n_bytes]
    assert metrics["val/bpb"] * n_bytes == pytest.approx(loss * n_tokens / math.log(2), rel=1e-6)
    assert n_bytes != n_tokens and metrics["val/bpb"] != pytest.approx(loss / math.log(2))  # a token is not a byte here
