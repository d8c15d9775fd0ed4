"""From a corpus to reproducible training batches.

    shards (.jsonl / .jsonl.gz / .parquet, see corpus.py)  ->  token cache (token_cache.py: memmap, built once, in parallel)
        ->  fixed train/val/test split by document  ->  Packed or Padded dataset
        ->  BatchSampler (seeded, resumable, rank-sliced) / eval_batches

Every document is tokenized once into `<cache_dir>/<key>/tokens.bin` as
`[bos] + ids + [eos]`; later runs memory-map it, so memory stays flat whatever
the corpus size. Both datasets give the same item:
`{"input_ids": [seq_len], "labels": [seq_len], "loss_mask": [seq_len]}`, where
labels are input_ids shifted by one and loss_mask is 1.0 where the loss counts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from research.corpus import ReadStats, resolve_shards, sample_texts, total_size
from research.errors import UserError
from research.progress import WorkProgress, format_seconds
from research.token_cache import TokenCache, clean_stale_temps, env_var, open_token_cache, temp_prefix
from research.tokenizer import tokenizer_digest, tokens_per_char, train_tokenizer

COPY_CHUNK = 1 << 24  # tokens per copy when writing a split's stream
SPLIT_SEED = 0  # the validation and test splits never depend on the training seed
TOKENIZER_SAMPLE_BYTES = 100_000_000  # text a tokenizer is trained on by default: enough for a small vocabulary, minutes not hours


# -----------------------------------------------------------------------------
# the validation and test splits


def split_documents(n_docs: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test doc ids), each sorted: fixed random shares of documents, whatever the seed.

    Documents are numbered across all shards, so a document is in exactly one split. The validation
    documents are the same with or without a test split (the test share is taken from training),
    so val losses of runs logged before `data.test_fraction` existed stay comparable.
    """
    n_test = max(1, round(test_fraction * n_docs)) if test_fraction > 0 else 0
    if n_docs < 2 + (n_test > 0):
        raise UserError(f"the corpus has {n_docs} document(s); a train/validation{'/test' if n_test else ''} split needs at least "
                        f"{2 + (n_test > 0)} (one JSON line per document{'; data.test_fraction=0 needs one fewer' if n_test else ''})")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1 - (n_test > 0))
    n_test = min(n_test, n_docs - 1 - n_val)
    order = np.random.default_rng(SPLIT_SEED).permutation(n_docs)
    return np.sort(order[n_val + n_test:]), np.sort(order[:n_val]), np.sort(order[n_val:n_val + n_test])


def split_stream(cache: TokenCache, doc_ids: np.ndarray) -> np.memmap:
    """The documents doc_ids concatenated, as a memmap cached beside the corpus (copied in bounded chunks)."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    target = cache.folder / f"docs-{hashlib.sha256(doc_ids.tobytes()).hexdigest()[:16]}.bin"
    if not target.exists():
        clean_stale_temps(cache.folder)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), dir=cache.folder)
        try:
            with os.fdopen(fd, "wb") as out:
                for start, end in _runs(cache.doc_offsets, doc_ids):
                    for lo in range(start, end, COPY_CHUNK):
                        out.write(cache.tokens[lo:min(end, lo + COPY_CHUNK)].tobytes())
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return np.memmap(target, dtype=cache.tokens.dtype, mode="r")


def _runs(doc_offsets: np.ndarray, doc_ids: np.ndarray) -> Iterator[tuple[int, int]]:
    """Token ranges covering sorted doc_ids, consecutive documents merged into one range."""
    breaks = np.flatnonzero(np.diff(doc_ids) != 1) + 1
    for run in np.split(doc_ids, breaks):
        if len(run):
            yield int(doc_offsets[run[0]]), int(doc_offsets[run[-1] + 1])


# -----------------------------------------------------------------------------
# datasets


def _as_item(windows: np.ndarray, loss_mask: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows of seq_len + 1 tokens -> inputs, next-token labels and mask (aligned with the labels)."""
    windows = windows.astype(np.int64, copy=False)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
        "loss_mask": torch.from_numpy(np.ascontiguousarray(loss_mask, dtype=np.float32)),
    }


class PackedDataset:
    """A token stream cut into non-overlapping windows: item i = stream[i*L : i*L + L + 1], no padding.

    Documents run into each other, each already wrapped in [bos] ... [eos].
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n_tokens = len(tokens)
        self.offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        windows = np.asarray(self.tokens[indices[:, None] * self.seq_len + self.offsets])
        return _as_item(windows, np.ones((len(indices), self.seq_len), dtype=np.float32))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([i]).items()}

    def row_tokens(self, i: int) -> int:
        """Target tokens of item i: a full window."""
        return self.seq_len


class PaddedDataset:
    """One document per row, as minimind's PretrainDataset: truncated or padded, never mixed with another.

    Row = [bos] + text_ids[:seq_len - 1] + [eos], padded with pad_id to seq_len + 1;
    loss_mask is 0 exactly where the label is padding.
    """

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, doc_ids: np.ndarray, seq_len: int, pad_id: int):
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.tokens, self.seq_len, self.pad_id = tokens, seq_len, pad_id
        self.starts, self.ends = doc_offsets[doc_ids], doc_offsets[doc_ids + 1]  # each doc is [bos] ... [eos]
        self.n_tokens = int((self.ends - self.starts).sum())
        self.offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return len(self.starts)

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.starts[indices], self.ends[indices]
        lengths = np.minimum(ends - starts, self.seq_len + 1)
        positions = np.minimum(starts[:, None] + self.offsets, ends[:, None] - 1)
        rows = np.where(self.offsets < lengths[:, None], self.tokens[positions], self.pad_id).astype(np.int64)
        rows[np.arange(len(indices)), lengths - 1] = self.tokens[ends - 1]  # a truncated document still ends in eos
        return _as_item(rows, rows[:, 1:] != self.pad_id)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([i]).items()}

    def row_tokens(self, i: int) -> int:
        """Target tokens of item i: its document's tokens after the first, up to seq_len."""
        return int(min(self.ends[i] - self.starts[i], self.seq_len + 1)) - 1


# -----------------------------------------------------------------------------
# from config to datasets


@dataclass
class DataInfo:
    """What a run should log about its data."""

    data_digest: str
    tokenizer_digest: str
    cache_path: str
    cache_hit: bool
    n_docs: int
    n_train_docs: int
    n_val_docs: int
    n_test_docs: int
    train_tokens: int
    val_tokens: int
    test_tokens: int
    train_items: int  # windows (packed) or documents (padded)
    val_items: int
    skipped_lines: int
    vocab_size: int  # len(tokenizer); the model's vocab_size must be at least this
    sources: list[dict[str, Any]] = field(default_factory=list)  # a mixture's sources: name, weight, train_tokens (research/mixture.py)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Dataset = PackedDataset | PaddedDataset


def build_datasets(data_cfg, tokenizer) -> tuple[Dataset, Dataset, Dataset | None, DataInfo]:
    """(train, val, test, info) for a DataConfig: tokenize once (cached), split by document, pack or pad.

    test is None when `data.test_fraction` is 0 (runs logged before the key existed).
    """
    cache = open_token_cache(data_cfg.path, tokenizer, data_cfg.text_key, data_cfg.skip_bad_lines, data_cfg.cache_dir, data_cfg.workers)
    train_ids, val_ids, test_ids = split_documents(cache.n_docs, data_cfg.val_fraction, data_cfg.test_fraction)
    seq_len = data_cfg.seq_len
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cache.meta["eos_id"]

    def dataset(doc_ids: np.ndarray) -> Dataset:
        if data_cfg.packing:
            return PackedDataset(split_stream(cache, doc_ids), seq_len)
        return PaddedDataset(cache.tokens, cache.doc_offsets, doc_ids, seq_len, pad_id)

    train, val = dataset(train_ids), dataset(val_ids)
    test = dataset(test_ids) if len(test_ids) else None
    checks = [("training", train, "lower data.seq_len, data.val_fraction or data.test_fraction"),
              ("validation", val, "lower data.seq_len or raise data.val_fraction"), ("test", test, "lower data.seq_len or raise data.test_fraction")]
    for name, ds, fix in checks:
        if ds is not None and len(ds) == 0:
            raise UserError(f"the {name} split has {ds.n_tokens} tokens, fewer than one sequence of data.seq_len + 1 = {seq_len + 1}; {fix}, or use a larger corpus")
    info = DataInfo(
        data_digest=cache.meta["data_digest"], tokenizer_digest=cache.meta["tokenizer_digest"], cache_path=str(cache.folder),
        cache_hit=cache.hit, n_docs=cache.n_docs, n_train_docs=len(train_ids), n_val_docs=len(val_ids), n_test_docs=len(test_ids),
        train_tokens=cache.doc_tokens(train_ids), val_tokens=cache.doc_tokens(val_ids), test_tokens=cache.doc_tokens(test_ids),
        train_items=len(train), val_items=len(val), skipped_lines=cache.meta["skipped_lines"], vocab_size=len(tokenizer),
    )
    return train, val, test, info


# -----------------------------------------------------------------------------
# a tokenizer of one's own


def train_tokenizer_on_corpus(path: Any, out_dir: str | Path, vocab_size: int = 6400, sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
                              text_key: str = "text", skip_bad_lines: bool = False, workers: int = 0, seed: int = 0):
    """Train the byte-level BPE on a random sample of a data.path spec (see corpus.sample_texts) and save it to out_dir.

    The BPE trainer uses every core unless workers=1 (it parallelises itself when TOKENIZERS_PARALLELISM
    is not false). Prints progress while sampling and a summary line; returns the tokenizer.
    """
    shards, stats, start = resolve_shards(path), ReadStats(), time.time()
    with WorkProgress("sampling the corpus", total_size(shards), "documents") as progress:
        sample = sample_texts(shards, sample_bytes, text_key, skip_bad_lines, stats, seed, progress.update)
    taken = sum(len(text.encode("utf-8")) for text in sample)
    print(f"sampled {taken / 1e6:,.1f} MB ({len(sample):,} of {stats.documents:,} documents from {len(shards)} shard(s), seed {seed}); "
          f"learning {vocab_size:,} tokens ...", flush=True)
    with env_var("TOKENIZERS_PARALLELISM", "false" if workers == 1 else "true"):
        tokenizer = train_tokenizer(sample, out_dir, vocab_size)
    ratio = tokens_per_char(tokenizer, sample[:2000])
    print(f"saved {out_dir}: vocab {len(tokenizer):,}, {ratio:.3f} tokens per character, trained in {format_seconds(time.time() - start)}, "
          f"digest {tokenizer_digest(tokenizer)}; train on it with data.tokenizer={out_dir}", flush=True)
    return tokenizer


# -----------------------------------------------------------------------------
# batches


class BatchSampler:
    """Training batches forever: seeded per epoch, resumable, and sliced per rank.

    Epoch e visits default_rng([seed, e]).permutation(len(ds)); each step takes the next
    batch_size * world_size indices and rank r keeps its contiguous slice. The incomplete
    tail of an epoch is dropped, so every rank always sees a full batch.
    """

    def __init__(self, ds, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.ds, self.batch_size, self.seed, self.rank, self.world_size = ds, batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        if len(ds) < self.global_batch:
            raise UserError(
                f"the training split has {len(ds)} sequences ({ds.n_tokens} tokens) but one step needs "
                f"train.batch_size x ranks = {batch_size} x {world_size} = {self.global_batch}; lower train.batch_size "
                f"(with data.packing=true, lowering data.seq_len also gives more sequences)"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))

    def next_indices(self) -> np.ndarray:
        if self.cursor + self.global_batch > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        step = self._order[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        return step[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.ds.get_batch(self.next_indices())

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "sources" in state:
            raise UserError(f"the checkpoint's data position is for the mixture {sorted(state['sources'])}; resume with the data.sources the run was started with")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def eval_batches(ds, batch_size: int, max_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first max_batches batches of ds, in order: the same validation data every time.

    The last batch is smaller when ds runs out first.
    """
    end = min(len(ds), batch_size * max_batches)
    for start in range(0, end, batch_size):
        yield ds.get_batch(np.arange(start, min(start + batch_size, end)))
