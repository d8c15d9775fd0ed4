"""From JSONL lines to batches: exact windows, minimind padding, a fixed split, resumable sampling, clear errors."""

import gzip
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from research.config import REPO_ROOT, DataConfig
from research.corpus import ReadStats, data_digest, iter_documents
from research.data import BatchSampler, build_datasets, eval_batches, split_documents
from research.token_cache import open_token_cache
from research.errors import UserError
from research.tokenizer import load_tokenizer, train_tokenizer

SHAKESPEARE = REPO_ROOT / "data" / "shakespeare.jsonl.gz"
SLICE = slice(200, 260)  # holds the corpus's shortest line (doc 224, 94 characters) among ordinary ~2,000-char ones


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("data/tokenizer")


@pytest.fixture(scope="module")
def texts():
    return list(itertools.islice(iter_documents(SHAKESPEARE), SLICE.start, SLICE.stop))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "slice.jsonl", [{"text": t, "title": f"document {i}"} for i, t in enumerate(texts)])


@pytest.fixture()
def cfg(corpus, tmp_path):
    return DataConfig(path=str(corpus), cache_dir=str(tmp_path / "cache"), seq_len=64, val_fraction=0.1)


def encode_doc(tokenizer, text):
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# -----------------------------------------------------------------------------
# packed windows and the cache


def test_packed_windows_cover_the_split_exactly(cfg, tokenizer, texts):
    train, val, test, info = build_datasets(cfg, tokenizer)
    train_ids, val_ids, test_ids = split_documents(len(texts), cfg.val_fraction, cfg.test_fraction)
    for ds, doc_ids in [(train, train_ids), (val, val_ids), (test, test_ids)]:
        stream = np.concatenate([encode_doc(tokenizer, texts[d]) for d in doc_ids])
        L = cfg.seq_len
        assert isinstance(ds.tokens, np.memmap) and np.array_equal(ds.tokens, stream)
        assert len(ds) == (len(stream) - 1) // L
        batch = ds.get_batch(np.arange(len(ds)))
        x, y, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
        assert x.shape == (len(ds), L) and x.dtype == torch.long and y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # labels are inputs shifted by one
        assert np.array_equal(x.flatten().numpy(), stream[: len(ds) * L])  # windows tile the stream, no gaps or overlap
        assert np.array_equal(y[:, -1].numpy(), stream[L : len(ds) * L + 1 : L])  # last label is the next window's first input
        assert bool((mask == 1).all()) and not bool((x == tokenizer.pad_token_id).any())
        item = ds[3]
        assert torch.equal(item["input_ids"], x[3]) and torch.equal(item["labels"], y[3])
    assert info.train_tokens == len(train.tokens) and info.val_tokens == len(val.tokens)
    assert (info.n_docs, info.n_val_docs, info.n_test_docs, info.n_train_docs) == (60, 6, 3, 51)  # 10% val, 5% test (the default)
    assert info.test_tokens == len(test.tokens)
    assert info.vocab_size == 6400 and info.skipped_lines == 0


def test_cache_is_reused_not_rebuilt(cfg, tokenizer):
    _, _, _, first = build_datasets(cfg, tokenizer)
    tokens_bin = Path(first.cache_path) / "tokens.bin"
    stamp = tokens_bin.stat().st_mtime_ns
    listing = sorted(os.listdir(first.cache_path))
    _, _, _, second = build_datasets(cfg, tokenizer)
    assert not first.cache_hit and second.cache_hit
    assert second.cache_path == first.cache_path and tokens_bin.stat().st_mtime_ns == stamp
    assert sorted(os.listdir(first.cache_path)) == listing  # split streams reused too
    assert os.listdir(Path(first.cache_path).parent) == [Path(first.cache_path).name]  # no temp folders left


def test_cache_key_follows_data_tokenizer_and_text_key(cfg, tokenizer, corpus, tmp_path, texts):
    _, _, _, base = build_datasets(cfg, tokenizer)
    edited = write_jsonl(tmp_path / "edited.jsonl", [{"text": t} for t in texts[:-1]])
    assert data_digest(edited) != data_digest(corpus)
    _, _, _, other_data = build_datasets(DataConfig(**{**cfg.__dict__, "path": str(edited)}), tokenizer)
    small = train_tokenizer(iter_documents(corpus), tmp_path / "tok", vocab_size=600)
    _, _, _, other_tok = build_datasets(cfg, small)
    _, _, _, other_key = build_datasets(DataConfig(**{**cfg.__dict__, "text_key": "title", "seq_len": 2}), tokenizer)
    _, _, _, padded = build_datasets(DataConfig(**{**cfg.__dict__, "packing": False}), tokenizer)
    assert len({base.cache_path, other_data.cache_path, other_tok.cache_path, other_key.cache_path}) == 4
    assert padded.cache_path == base.cache_path  # packing and seq_len do not change the token cache
    assert other_data.n_docs == 59 and other_tok.vocab_size == 600 and other_tok.train_tokens > base.train_tokens


# -----------------------------------------------------------------------------
# padded rows, as minimind's PretrainDataset


def minimind_row(tokenizer, text, max_length):
    """minimind's PretrainDataset.__getitem__ (max_length = seq_len + 1), written out directly."""
    tokens = tokenizer(text, add_special_tokens=False, max_length=max_length - 2, truncation=True).input_ids
    tokens = [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id]
    input_ids = tokens + [tokenizer.pad_token_id] * (max_length - len(tokens))
    x, y = torch.tensor(input_ids[:-1]), torch.tensor(input_ids[1:])
    return x, y, (y != tokenizer.pad_token_id).long()


def test_padded_rows_match_minimind(cfg, tokenizer, texts):
    cfg.packing = False
    train, val, _, info = build_datasets(cfg, tokenizer)
    train_ids, val_ids, _ = split_documents(len(texts), cfg.val_fraction, cfg.test_fraction)
    L, bos, eos, pad = cfg.seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (len(train), len(val)) == (len(train_ids), len(val_ids)) == (info.train_items, info.val_items)
    seen_short = seen_long = False
    for ds, doc_ids in [(train, train_ids), (val, val_ids)]:
        batch = ds.get_batch(np.arange(len(ds)))
        for row, doc in enumerate(doc_ids):
            x, y, mask = batch["input_ids"][row], batch["labels"][row], batch["loss_mask"][row]
            mx, my, mmask = minimind_row(tokenizer, texts[doc], L + 1)
            assert torch.equal(x, mx) and torch.equal(y, my) and torch.equal(mask.long(), mmask)
            n_text = len(tokenizer(texts[doc], add_special_tokens=False)["input_ids"])
            assert x[0] == bos
            if n_text + 2 > L + 1:  # a long line: truncated, still ends in eos, every label counts
                seen_long = True
                assert y[-1] == eos and bool((mask == 1).all())
                assert torch.equal(x[1:], torch.tensor(tokenizer(texts[doc], add_special_tokens=False)["input_ids"][: L - 1]))
            else:  # a short line: eos, then padding that the mask ignores
                seen_short = True
                n_real = n_text + 2
                assert x[n_real - 1] == eos and y[n_real - 2] == eos
                assert bool((x[n_real:] == pad).all()) and bool((y[n_real - 1 :] == pad).all())
                assert mask.sum() == n_real - 1 and bool((mask[: n_real - 1] == 1).all()) and bool((mask[n_real - 1 :] == 0).all())
    assert seen_short and seen_long  # doc 224 of the corpus is the short one


# -----------------------------------------------------------------------------
# the split and the sampler


def test_val_split_is_by_document_and_fixed():
    np.random.seed(1)
    train, val, test = split_documents(2799, 0.05)
    np.random.seed(2)
    train2, val2, _ = split_documents(2799, 0.05)
    assert np.array_equal(val, val2) and np.array_equal(train, train2) and len(test) == 0
    assert len(val) == 140 and not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(2799))
    assert list(val) != list(range(140))  # a random share, not the head of the file
    assert len(split_documents(2, 0.01)[1]) == 1 and len(split_documents(3, 0.9)[0]) == 1  # at least one doc each side
    with pytest.raises(UserError, match="at least 2"):
        split_documents(1, 0.1)


def test_test_split_is_disjoint_fixed_and_leaves_val_alone():
    train, val, test = split_documents(2799, 0.05, 0.05)
    old_train, old_val, _ = split_documents(2799, 0.05)
    assert np.array_equal(val, old_val)  # runs without a test split validate on the same documents
    assert len(test) == 140 and set(test) <= set(old_train) and np.array_equal(train, np.setdiff1d(old_train, test))
    assert not set(train) & set(test) and not set(val) & set(test)
    assert sorted(set(train) | set(val) | set(test)) == list(range(2799))
    assert np.array_equal(test, split_documents(2799, 0.05, 0.05)[2])  # whatever the training seed
    assert [len(part) for part in split_documents(3, 0.01, 0.01)] == [1, 1, 1]  # at least one doc each
    with pytest.raises(UserError, match="at least 3"):
        split_documents(2, 0.1, 0.1)


def test_val_docs_never_reach_training(cfg, tokenizer, texts):
    cfg.packing = False
    train, val, _, _ = build_datasets(cfg, tokenizer)
    first_tokens = lambda ds: {tuple(r.tolist()) for r in ds.get_batch(np.arange(len(ds)))["input_ids"]}
    assert not first_tokens(train) & first_tokens(val)


def test_sampler_resumes_exactly(cfg, tokenizer):
    train, _, _, _ = build_datasets(cfg, tokenizer)
    steps_per_epoch = len(train) // 8
    sampler = BatchSampler(train, batch_size=8, seed=7)
    for _ in range(steps_per_epoch - 2):
        sampler.next_batch()
    state = sampler.state_dict()
    assert state == {"epoch": 0, "cursor": (steps_per_epoch - 2) * 8}
    after = [sampler.next_batch() for _ in range(5)]  # runs into the next epoch
    assert sampler.state_dict()["epoch"] == 1
    resumed = BatchSampler(train, batch_size=8, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(after, [resumed.next_batch() for _ in range(5)]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed = BatchSampler(train, batch_size=8, seed=8).next_batch()
    fresh = BatchSampler(train, batch_size=8, seed=7).next_batch()
    assert not torch.equal(other_seed["input_ids"], fresh["input_ids"])


def test_epochs_follow_the_seeded_permutation(cfg, tokenizer):
    train, _, _, _ = build_datasets(cfg, tokenizer)
    sampler = BatchSampler(train, batch_size=8, seed=3)
    steps = len(train) // 8
    epoch0 = np.concatenate([sampler.next_indices() for _ in range(steps)])
    assert np.array_equal(epoch0, np.random.default_rng([3, 0]).permutation(len(train))[: steps * 8])
    assert np.array_equal(sampler.next_indices(), np.random.default_rng([3, 1]).permutation(len(train))[:8])  # tail dropped


def test_rank_slices_make_up_the_global_batch(cfg, tokenizer):
    train, _, _, _ = build_datasets(cfg, tokenizer)
    single = BatchSampler(train, batch_size=8, seed=5)
    ranks = [BatchSampler(train, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(len(train) // 8 + 3):  # across an epoch boundary
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])


def test_eval_batches_are_fixed(cfg, tokenizer):
    _, val, _, _ = build_datasets(cfg, tokenizer)
    first = list(eval_batches(val, batch_size=4, max_batches=3))
    again = list(eval_batches(val, batch_size=4, max_batches=3))
    assert len(first) == min(3, -(-len(val) // 4))
    assert torch.equal(first[0]["input_ids"], val.get_batch(np.arange(4))["input_ids"])
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, again))
    assert sum(len(b["input_ids"]) for b in eval_batches(val, 4, 10_000)) == len(val)


# -----------------------------------------------------------------------------
# errors: one line, naming the file and the line


def error_of(path, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        list(iter_documents(path, **kwargs))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_reader_errors_name_file_and_line(tmp_path):
    assert "not found" in error_of(tmp_path / "missing.jsonl") and "missing.jsonl" in error_of(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert "empty.jsonl has no documents" in error_of(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\n")
    assert "no documents" in error_of(tmp_path / "blank.jsonl")

    (tmp_path / "bad_json.jsonl").write_text('{"text": "a"}\n\n{"text": "b",\n')
    message = error_of(tmp_path / "bad_json.jsonl")
    assert "line 3 of" in message and "bad_json.jsonl" in message and "data.skip_bad_lines=true" in message

    (tmp_path / "no_key.jsonl").write_text('{"text": "a"}\n{"body": "b", "id": 4}\n')
    message = error_of(tmp_path / "no_key.jsonl")
    assert "line 2 of" in message and "no_key.jsonl" in message and "'body'" in message and "'id'" in message
    assert "data.text_key" in message

    (tmp_path / "not_text.jsonl").write_text('{"text": 5}\n')
    assert "line 1 of" in error_of(tmp_path / "not_text.jsonl")

    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    message = error_of(tmp_path / "latin1.jsonl")
    assert "line 2 of" in message and "latin1.jsonl" in message and "UTF-8" in message


def test_gzip_is_detected_by_content_and_truncation_is_caught(tmp_path, texts):
    payload = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "named_plain.jsonl").write_bytes(gzip.compress(payload))
    assert list(iter_documents(tmp_path / "named_plain.jsonl")) == texts
    (tmp_path / "named_gz.jsonl.gz").write_bytes(payload)
    assert list(iter_documents(tmp_path / "named_gz.jsonl.gz")) == texts
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(payload)[: len(gzip.compress(payload)) // 2])
    message = error_of(tmp_path / "cut.jsonl.gz")
    assert "cut.jsonl.gz" in message and "truncated or corrupt" in message
    corrupt = bytearray(gzip.compress(payload))
    corrupt[40:60] = b"\x00" * 20
    (tmp_path / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    assert "corrupt.jsonl.gz" in error_of(tmp_path / "corrupt.jsonl.gz")


def test_skip_bad_lines_skips_and_counts(tmp_path, tokenizer):
    lines = [b'{"text": "one two three four five six seven"}', b"{broken", b'{"other": 1}', b'{"text": "caf\xe9"}', b"",
             b'{"text": "eight nine ten eleven twelve"}']
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = ReadStats()
    assert len(list(iter_documents(path, skip_bad_lines=True, stats=stats))) == 2
    assert (stats.documents, stats.skipped_lines) == (2, 3) and "line 2 of" in stats.first_problem
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), seq_len=4, skip_bad_lines=True, val_fraction=0.5, test_fraction=0.0)
    _, _, _, info = build_datasets(cfg, tokenizer)
    assert info.skipped_lines == 3 and info.n_docs == 2
    cfg.skip_bad_lines = False  # a cache built while skipping must not make a strict run lenient
    with pytest.raises(UserError, match="line 2 of"):
        build_datasets(cfg, tokenizer)
    with pytest.raises(UserError, match="all 2 non-blank lines were bad"):
        list(iter_documents(write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}, {"y": 2}]), skip_bad_lines=True))


def test_too_little_data_says_what_to_lower(tmp_path, tokenizer, cfg):
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "just one"}])
    with pytest.raises(UserError, match="at least 3 .*data.test_fraction=0 needs one fewer"):
        build_datasets(DataConfig(path=str(one), cache_dir=str(tmp_path / "c1")), tokenizer)
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "a few words here"}, {"text": "and a few there"}])
    with pytest.raises(UserError, match=r"tokens, fewer than one sequence.*data\.seq_len"):
        build_datasets(DataConfig(path=str(short), cache_dir=str(tmp_path / "c2"), seq_len=64, test_fraction=0.0), tokenizer)
    train, _, _, _ = build_datasets(cfg, tokenizer)
    with pytest.raises(UserError, match=rf"has {len(train)} sequences.*train\.batch_size"):
        BatchSampler(train, batch_size=len(train), seed=0, world_size=2)


def test_token_dtype_and_offsets(cfg, tokenizer, texts):
    cache = open_token_cache(cfg.path, tokenizer, cache_dir=cfg.cache_dir)
    assert cache.tokens.dtype == np.uint16 and cache.doc_offsets.dtype == np.int64
    assert len(cache.doc_offsets) == len(texts) + 1 and cache.doc_offsets[-1] == len(cache.tokens)
    d = 7
    assert cache.tokens[cache.doc_offsets[d] : cache.doc_offsets[d + 1]].tolist() == encode_doc(tokenizer, texts[d])
