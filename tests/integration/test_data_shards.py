"""Corpora at working scale: folders, globs and lists of shards; a parallel cache build that is byte-identical
for any number of workers and survives being interrupted; a tokenizer trained on a folder of shards."""

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from research.config import REPO_ROOT, DataConfig, make_config
from research.corpus import data_digest, iter_documents, resolve_shards, sample_texts
from research.data import build_datasets
from research.token_cache import open_token_cache
from research.errors import UserError
from research.tokenizer import load_tokenizer, tokenizer_digest

SHAKESPEARE = REPO_ROOT / "data" / "shakespeare.jsonl.gz"
TANG_SONG = Path(__file__).parents[1] / "data" / "tang_song.jsonl"
CACHE_FILES = ("tokens.bin", "doc_offsets.npy", "meta.json")  # build.json (time, workers) is the only file allowed to differ


def lines_of(texts) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("data/tokenizer")


@pytest.fixture(scope="module")
def texts():
    """English and Chinese documents, so blocks cut through multi-byte text."""
    english = list(itertools.islice(iter_documents(SHAKESPEARE), 150))
    return [t for pair in itertools.zip_longest(english, list(iter_documents(TANG_SONG))[:150]) for t in pair if t]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, texts) -> Path:
    """Three shards (two gzipped, one plain) plus files a folder of shards may hold that are not shards."""
    folder = tmp_path_factory.mktemp("shards")
    parts = [texts[:100], texts[100:220], texts[220:]]
    (folder / "part-000.jsonl.gz").write_bytes(gzip.compress(lines_of(parts[0])))
    (folder / "part-001.jsonl").write_bytes(lines_of(parts[1]))
    (folder / "part-002.jsonl.gz").write_bytes(gzip.compress(lines_of(parts[2])))
    (folder / "README.txt").write_text("not a shard")
    (folder / "_SUCCESS").write_text("")
    return folder


def cache_files(cache) -> dict[str, bytes]:
    return {name: (cache.folder / name).read_bytes() for name in CACHE_FILES}


# -----------------------------------------------------------------------------
# what data.path can name


def test_folder_glob_and_list_name_the_same_sorted_shards(shards, capfd):
    expected = [shards / "part-000.jsonl.gz", shards / "part-001.jsonl", shards / "part-002.jsonl.gz"]
    assert resolve_shards(str(shards)) == expected
    warning = capfd.readouterr().err
    assert warning.count("\n") == 1 and "skipped 2" in warning and "README.txt" in warning and "_SUCCESS" in warning
    resolve_shards(str(shards))
    assert capfd.readouterr().err == ""  # listed once per process
    assert resolve_shards(f"{shards}/part-*.jsonl*") == expected
    assert resolve_shards([str(expected[2]), f"{shards}/*.jsonl.gz"]) == [expected[2], expected[0], expected[2]]
    cfg = make_config([f"data.path=[{expected[1]},{expected[0]}]"])
    assert resolve_shards(cfg.data.path) == [expected[1], expected[0]]
    assert make_config([f"data.path={shards}/"]).data.path == f"{shards}/"


def test_empty_folder_and_unmatched_glob_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec, fragment in [(str(tmp_path / "empty"), "has no .jsonl"), (f"{tmp_path}/*.jsonl.gz", "matches no files"),
                           (str(tmp_path / "missing"), "not found"), ([], "empty list")]:
        with pytest.raises(UserError, match=fragment) as err:
            resolve_shards(spec)
        assert "\n" not in str(err.value) and (str(tmp_path) in str(err.value) or spec == [])


def test_shards_cache_like_their_concatenation_and_a_new_shard_rebuilds(shards, texts, tokenizer, tmp_path):
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(lines_of(texts))
    one = open_token_cache(str(whole), tokenizer, cache_dir=tmp_path / "c", workers=1)
    many = open_token_cache(str(shards), tokenizer, cache_dir=tmp_path / "c", workers=1)
    assert one.folder != many.folder  # keyed by the shards' digests, not the concatenated bytes
    assert (one.folder / "tokens.bin").read_bytes() == (many.folder / "tokens.bin").read_bytes()
    assert np.array_equal(one.doc_offsets, many.doc_offsets) and many.meta["n_docs"] == len(texts)
    assert data_digest(str(shards / "part-001.jsonl")) == data_digest([str(shards / "part-001.jsonl")])  # one shard: its own digest

    grown = tmp_path / "grown"
    grown.mkdir()
    for shard in resolve_shards(str(shards)):
        (grown / shard.name).write_bytes(shard.read_bytes())
    assert open_token_cache(str(grown), tokenizer, cache_dir=tmp_path / "c").hit  # same content, same cache
    (grown / "part-003.jsonl").write_bytes(lines_of(["one more document"]))
    rebuilt = open_token_cache(str(grown), tokenizer, cache_dir=tmp_path / "c")
    assert not rebuilt.hit and rebuilt.n_docs == len(texts) + 1


def test_cache_is_byte_identical_for_one_and_two_workers(shards, texts, tokenizer, tmp_path):
    built = {w: open_token_cache(str(shards), tokenizer, cache_dir=tmp_path / f"w{w}", workers=w, block_bytes=16 << 10) for w in (1, 2)}
    assert json.loads((built[2].folder / "build.json").read_text())["workers"] == 2
    assert cache_files(built[1]) == cache_files(built[2])
    cache = built[2]
    for d in (0, 150, len(texts) - 1):  # the fast path gives exactly what tokenizer(text) gives
        ids = tokenizer(texts[d], add_special_tokens=False)["input_ids"]
        assert cache.tokens[cache.doc_offsets[d]:cache.doc_offsets[d + 1]].tolist() == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def test_bad_line_names_its_shard_and_line_whatever_the_workers(tmp_path, texts, tokenizer):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(lines_of(texts[:50]))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines_of(texts[:40]) + b"{broken\n" + lines_of(texts[40:60])))
    for workers in (1, 2):
        with pytest.raises(UserError, match=r"line 41 of .*b\.jsonl\.gz is not valid JSON") as err:
            open_token_cache(str(folder), tokenizer, cache_dir=tmp_path / "c", workers=workers, block_bytes=4 << 10)
        assert "\n" not in str(err.value)
    assert not list((tmp_path / "c").iterdir())  # nothing half-built left behind
    cfg = DataConfig(path=str(folder), cache_dir=str(tmp_path / "c"), skip_bad_lines=True, workers=2)
    _, _, _, info = build_datasets(cfg, tokenizer)
    assert info.skipped_lines == 1 and info.n_docs == 110


def test_val_split_is_the_same_share_of_documents_for_any_workers(shards, tokenizer, tmp_path):
    infos = [build_datasets(DataConfig(path=str(shards), cache_dir=str(tmp_path / f"c{w}"), workers=w), tokenizer)[3] for w in (1, 2)]
    assert infos[0].as_dict() | {"cache_path": ""} == infos[1].as_dict() | {"cache_path": ""}
    assert infos[0].n_val_docs == round(0.05 * infos[0].n_docs)


# -----------------------------------------------------------------------------
# interrupted builds


BUILD = """
import sys
from research.token_cache import open_token_cache
from research.tokenizer import load_tokenizer
open_token_cache(sys.argv[1], load_tokenizer("data/tokenizer"), cache_dir=sys.argv[2], workers=2, block_bytes=64 << 10)
"""


def start_build(corpus: Path, cache_dir: Path) -> subprocess.Popen:
    """A build in its own process, with Ctrl-C restored: a shell that starts a job in the background (`cmd &`) hands it SIGINT ignored."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", BUILD, str(corpus), str(cache_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


BIG_COPIES = 48


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, texts) -> Path:
    """About 17 MB of text: a build of a few seconds, so the signal lands half way even when the test's own process
    waits for a core that the two workers hold."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    path.write_bytes(lines_of(texts) * BIG_COPIES)
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_build_leaves_nothing_trusted_and_reruns_cleanly(sig, big_corpus, tokenizer, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = start_build(big_corpus, cache_dir)
    first = proc.stdout.readline()  # printed when tokenizing starts, even into a pipe
    assert first.startswith("tokenizing: "), first + proc.stderr.read()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "token cache built" not in out, out + err
    assert not list(cache_dir.glob("*/meta.json"))  # no cache to trust
    left = list(cache_dir.glob("*.tmp-*"))
    assert (left == []) if sig == signal.SIGINT else (len(left) == 1)  # Ctrl-C cleans up; a kill leaves a temp folder
    cache = open_token_cache(str(big_corpus), tokenizer, cache_dir=cache_dir, workers=2, block_bytes=256 << 10)
    assert not cache.hit and not list(cache_dir.glob("*.tmp-*"))  # the killed build's temp folder is gone
    assert cache.n_docs == BIG_COPIES * 300 and cache.doc_offsets[-1] == len(cache.tokens)


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="finds the workers through Linux's /proc")
def test_a_worker_that_dies_stops_the_build_with_one_line(big_corpus, tmp_path):
    proc = start_build(big_corpus, tmp_path / "cache")
    assert proc.stdout.readline().startswith("tokenizing: ")
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "UserError: a tokenizing worker process died" in err and "fewer data.workers" in err
    assert not list((tmp_path / "cache").iterdir())  # its temp folder is gone, and no cache was published


def test_build_reports_progress_and_a_summary_into_a_pipe(tmp_path, shards):
    proc = start_build(shards, tmp_path / "cache")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("tokenizing: ") and "MB" in lines[0]
    summary = lines[-1]
    assert summary.startswith("token cache built in") and "300 documents from 3 shard(s)" in summary and "tokens" in summary and "MB at" in summary


# -----------------------------------------------------------------------------
# a tokenizer of one's own, then training on it


def test_sample_is_random_over_all_shards_bounded_and_seeded(shards, texts):
    files = resolve_shards(str(shards))
    sample = sample_texts(files, 30_000, seed=0)
    assert sample == sample_texts(files, 30_000, seed=0) and sample != sample_texts(files, 30_000, seed=1)
    sizes = [len(t.encode()) for t in sample]
    assert 30_000 <= sum(sizes) < 30_000 + max(sizes) and len(set(sample)) == len(sample)
    where = [min(i for i, t in enumerate(texts) if t == s) for s in sample]  # position in the corpus (shards in order)
    assert all(any(lo <= w < hi for w in where) for lo, hi in [(0, 100), (100, 220), (220, 300)])  # every shard contributes ...
    assert any(50 <= w < 100 for w in where) and any(w >= 270 for w in where)  # ... and not only its head
    assert where != sorted(where)  # in random order, not the corpus's
    assert sorted(sample_texts(files, 10**9)) == sorted(texts)  # a budget over the corpus takes it whole


def test_tokenizer_command_on_a_folder_then_training_uses_it(shards, tmp_path, tiny_cfg):
    from research.trainer import train

    out = tmp_path / "my_tokenizer"
    proc = run_cli("tokenizer", f"data.path={shards}", f"out={out}", "vocab_size=400", "sample_bytes=200000")
    assert proc.returncode == 0, proc.stderr
    assert "saved" in proc.stdout and "tokens per character" in proc.stdout
    mine = load_tokenizer(out)
    assert len(mine) == 400
    result = train(tiny_cfg(data__path=str(shards), data__tokenizer=str(out), tracking__enabled=False, train__max_steps=2,
                            train__warmup_steps=1, train__sample_tokens=0))
    assert tokenizer_digest(result.tokenizer) == tokenizer_digest(mine)
    assert result.steps == 2 and np.isfinite(result.final_val_loss)
    bad = run_cli("tokenizer", f"data.path={tmp_path}/nothing-*.jsonl", f"out={out}")
    assert bad.returncode == 2 and "matches no files" in bad.stderr
