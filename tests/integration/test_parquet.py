"""Parquet shards in data.path: read by row group, cached byte-identically for any number of workers, mixed with
JSONL in one folder, and every bad input one line."""

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_one_line_error, run_cli
from research.config import REPO_ROOT, DataConfig
from research.corpus import iter_documents, resolve_shards
from research.data import build_datasets
from research.errors import UserError
from research.token_cache import open_token_cache
from research.tokenizer import load_tokenizer

SHAKESPEARE = REPO_ROOT / "data" / "shakespeare.jsonl.gz"
CACHE_FILES = ("tokens.bin", "doc_offsets.npy", "meta.json")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("data/tokenizer")


@pytest.fixture(scope="module")
def texts():
    return list(itertools.islice(iter_documents(SHAKESPEARE), 240)) + ["", "日本語のテキスト 🍣"]


def write_parquet(path, texts, row_group_size=40, **columns):
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts, **columns}), path, row_group_size=row_group_size)


def jsonl(texts) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, texts):
    """A folder of two parquet shards (several row groups each) and a JSONL shard between them, by name."""
    folder = tmp_path_factory.mktemp("mixed")
    write_parquet(folder / "a.parquet", texts[:100])
    (folder / "b.jsonl").write_bytes(jsonl(texts[100:150]))
    write_parquet(folder / "c.parquet", texts[150:], row_group_size=25)
    return folder


def test_mixed_folder_caches_like_the_same_text_as_jsonl_for_any_workers(mixed, texts, tokenizer, tmp_path):
    assert [p.name for p in resolve_shards(str(mixed))] == ["a.parquet", "b.jsonl", "c.parquet"]
    assert list(iter_documents(mixed / "c.parquet")) == texts[150:]
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(jsonl(texts))
    reference = open_token_cache(str(whole), tokenizer, cache_dir=tmp_path / "ref", workers=1)
    built = {w: open_token_cache(str(mixed), tokenizer, cache_dir=tmp_path / f"w{w}", workers=w, block_bytes=4 << 10) for w in (1, 2)}
    assert {name: (built[1].folder / name).read_bytes() for name in CACHE_FILES} == {name: (built[2].folder / name).read_bytes() for name in CACHE_FILES}
    assert (built[2].folder / "tokens.bin").read_bytes() == (reference.folder / "tokens.bin").read_bytes()
    assert np.array_equal(built[2].doc_offsets, reference.doc_offsets) and built[2].n_docs == len(texts)
    assert built[2].meta["jsonl_bytes"] == len(jsonl(texts[100:150])) + sum(len(t.encode()) for t in texts[:100] + texts[150:])


def test_a_parquet_folder_trains_through_data_path_alone(tmp_path, texts, tiny_cfg):
    from research.trainer import train

    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", texts[:120])
    write_parquet(folder / "part-1.parquet", texts[120:])
    result = train(tiny_cfg(data__path=str(folder), tracking__enabled=False, train__max_steps=2, train__warmup_steps=1, train__sample_tokens=0))
    assert result.steps == 2 and np.isfinite(result.final_val_loss)


def test_missing_column_is_one_line_with_exit_2_naming_the_file_and_its_columns(tmp_path, texts):
    write_parquet(tmp_path / "a.parquet", texts[:10])
    proc = run_cli("tokenizer", f"data.path={tmp_path}", "data.text_key=content", f"out={tmp_path / 'tok'}")
    assert_one_line_error(proc, "a.parquet has no column 'content'", "'id', 'text'", "data.text_key")


def test_an_unreadable_file_is_named(tmp_path, tokenizer):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(UserError, match=r"broken\.parquet is not a readable parquet file") as err:
        open_token_cache(str(tmp_path), tokenizer, cache_dir=tmp_path / "c", workers=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["null", "not a string"])
def test_null_and_non_string_values_are_refused_or_counted_and_skipped(tmp_path, texts, tokenizer, kind):
    if kind == "null":
        write_parquet(tmp_path / "a.parquet", texts[:60] + [None, None] + texts[60:100])
        fragment, skipped, docs = r"row 60 of .*a\.parquet: 'text' is null", 2, 100
    else:
        write_parquet(tmp_path / "a.parquet", texts[:100])
        pq.write_table(pa.table({"text": list(range(30))}), tmp_path / "b.parquet")
        fragment, skipped, docs = r"column 'text' of .*b\.parquet holds int64, not strings", 30, 100
    for workers in (1, 2):
        with pytest.raises(UserError, match=fragment) as err:
            open_token_cache(str(tmp_path), tokenizer, cache_dir=tmp_path / "c", workers=workers, block_bytes=1 << 10)
        assert "\n" not in str(err.value) and "data.skip_bad_lines=true" in str(err.value)
    _, _, _, info = build_datasets(DataConfig(path=str(tmp_path), cache_dir=str(tmp_path / "c"), skip_bad_lines=True, workers=2), tokenizer)
    assert info.skipped_lines == skipped and info.n_docs == docs
