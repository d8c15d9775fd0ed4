"""From a JSONL corpus to reproducible training batches.

    documents (.jsonl / .jsonl.gz)  ->  token cache (memmap, built once)
        ->  fixed train/val split by document  ->  Packed or Padded dataset
        ->  BatchSampler (seeded, resumable, rank-sliced) / eval_batches

Every document is tokenized once into `<cache_dir>/<key>/tokens.bin` as
`[bos] + ids + [eos]`; later runs memory-map it, so memory stays flat whatever
the corpus size. Both datasets give the same item:
`{"input_ids": [seq_len], "labels": [seq_len], "loss_mask": [seq_len]}`, where
labels are input_ids shifted by one and loss_mask is 1.0 where the loss counts.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from research.config import resolve_path
from research.errors import UserError
from research.tokenizer import tokenizer_digest

CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are not misread
TOKENIZE_CHUNK = 256  # documents per tokenizer call: bounds memory while building the cache
COPY_CHUNK = 1 << 24  # tokens per copy when writing a split's stream
SPLIT_SEED = 0  # the validation split never depends on the training seed
SKIP_HINT = "or set data.skip_bad_lines=true to skip such lines"


# -----------------------------------------------------------------------------
# reading documents


@dataclass
class ReadStats:
    """What a pass over a corpus saw; filled in by iter_documents as it goes."""

    documents: int = 0
    skipped_lines: int = 0
    first_problem: str = ""  # the error the first skipped line would have raised


def iter_documents(path: str | Path, text_key: str = "text", skip_bad_lines: bool = False, stats: ReadStats | None = None) -> Iterator[str]:
    """The text of each line of a .jsonl or .jsonl.gz file (gzip is told by its magic bytes).

    Blank lines are ignored. A bad line (not UTF-8, not JSON, no `text_key`) stops the
    read with a UserError naming file and line, or with skip_bad_lines is skipped and
    counted in `stats`. The one reader of documents in the project.
    """
    path = resolve_path(str(path))
    stats = ReadStats() if stats is None else stats
    for lineno, raw in _numbered_lines(path):
        if not raw.strip():
            continue
        text, problem = _parse_line(raw, lineno, path, text_key)
        if problem:
            if not skip_bad_lines:
                raise UserError(problem)
            stats.skipped_lines += 1
            stats.first_problem = stats.first_problem or problem
            continue
        stats.documents += 1
        yield text
    if stats.documents == 0:
        if stats.skipped_lines:
            raise UserError(f"{path} has no usable documents: all {stats.skipped_lines} non-blank lines were bad (first: {stats.first_problem})")
        raise UserError(f"{path} has no documents (it is empty or blank); point data.path at a JSONL file with one {{\"{text_key}\": ...}} per line")


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for each line, through gzip when the file starts with its magic bytes."""
    if not path.exists():
        raise UserError(f"data file not found: {path}; set data.path to a .jsonl or .jsonl.gz file")
    if not path.is_file():
        raise UserError(f"data path is not a file: {path}; set data.path to a .jsonl or .jsonl.gz file")
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    lineno = 0
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(f"{path} is a truncated or corrupt gzip file (failed after line {lineno}: {err}); re-create or re-download it") from None


def _parse_line(raw: bytes, lineno: int, path: Path, text_key: str) -> tuple[str, str]:
    """(text, "") for a good line, ("", one-line reason) for a bad one."""
    where = f"line {lineno} of {path}"
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return "", f"{where} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); re-encode the file as UTF-8 {SKIP_HINT}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return "", f"{where} is not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno}); fix the line {SKIP_HINT}"
    if not isinstance(record, dict):
        return "", f"{where} is a JSON {type(record).__name__}, not an object with a '{text_key}' field; fix the line {SKIP_HINT}"
    if text_key not in record:
        keys = ", ".join(repr(k) for k in record) or "none"
        return "", f"{where} has no '{text_key}' key (its keys: {keys}); set data.text_key to the field holding the text {SKIP_HINT}"
    text = record[text_key]
    if not isinstance(text, str):
        return "", f"{where}: '{text_key}' is a JSON {type(text).__name__}, not a string; fix the line {SKIP_HINT}"
    return text, ""


def data_digest(path: str | Path) -> str:
    """16 hex digits of sha256 over the file's bytes, read in chunks."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise UserError(f"data file not found: {path}; set data.path to a .jsonl or .jsonl.gz file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# the token cache


@dataclass
class TokenCache:
    """A corpus tokenized once: document d is tokens[doc_offsets[d]:doc_offsets[d+1]] = [bos] + ids + [eos]."""

    folder: Path
    tokens: np.memmap  # flat, uint16 or uint32
    doc_offsets: np.ndarray  # int64, n_docs + 1
    meta: dict[str, Any]
    hit: bool  # loaded from an earlier run rather than built now

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def doc_tokens(self, doc_ids: np.ndarray) -> int:
        return int((self.doc_offsets[doc_ids + 1] - self.doc_offsets[doc_ids]).sum())


def cache_key(data_digest_: str, tokenizer_digest_: str, text_key: str) -> str:
    """Folder name of a cache: changes with the data bytes, the tokenizer, the text field or the format."""
    identity = json.dumps([CACHE_FORMAT, data_digest_, tokenizer_digest_, text_key])
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def open_token_cache(path: str | Path, tokenizer, text_key: str = "text", skip_bad_lines: bool = False, cache_dir: str | Path = "results/cache") -> TokenCache:
    """Load the cache for (data, tokenizer, text_key), building it first if there is none."""
    path = resolve_path(str(path))
    digest, tok_digest = data_digest(path), tokenizer_digest(tokenizer)
    folder = resolve_path(str(cache_dir)) / cache_key(digest, tok_digest, text_key)
    hit = (folder / "meta.json").exists()
    if not hit:
        _build_cache(folder, path, tokenizer, text_key, skip_bad_lines, digest, tok_digest)
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    doc_offsets = np.load(folder / "doc_offsets.npy")
    if meta.get("format") != CACHE_FORMAT or len(tokens) != doc_offsets[-1] or len(doc_offsets) != meta["n_docs"] + 1:
        raise UserError(f"token cache {folder} is inconsistent (edited or from another version); delete that folder and run again")
    if meta["skipped_lines"] and not skip_bad_lines:
        raise UserError(meta["first_problem"])  # the cache was built with skipping on; stay as strict as a fresh read
    return TokenCache(folder, tokens, doc_offsets, meta, hit)


def _build_cache(folder: Path, path: Path, tokenizer, text_key: str, skip_bad_lines: bool, digest: str, tok_digest: str) -> None:
    """Tokenize every document into a temp folder, then rename it into place: a crash never leaves half a cache."""
    start = time.time()
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise UserError(f"the tokenizer has no {'bos' if bos is None else 'eos'} token; train one with `python -m research.tokenizer CORPUS OUT_DIR`")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache is as readable as any other output
    try:
        stats = ReadStats()
        texts = iter_documents(path, text_key, skip_bad_lines, stats)
        offsets = [0]
        with open(tmp / "tokens.bin", "wb") as out:
            while batch := list(itertools.islice(texts, TOKENIZE_CHUNK)):
                ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
                docs = [np.asarray([bos, *doc, eos], dtype=dtype) for doc in ids]
                out.write(np.concatenate(docs).tobytes())
                for doc in docs:
                    offsets.append(offsets[-1] + len(doc))
        np.save(tmp / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
        meta = {
            "format": CACHE_FORMAT, "data_path": str(path), "data_digest": digest, "tokenizer_digest": tok_digest,
            "text_key": text_key, "vocab_size": vocab_size, "dtype": dtype.name, "bos_id": bos, "eos_id": eos,
            "n_docs": len(offsets) - 1, "n_tokens": offsets[-1], "skipped_lines": stats.skipped_lines,
            "first_problem": stats.first_problem, "build_seconds": round(time.time() - start, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename tmp to folder; if another process got there first, keep theirs (same inputs, same content)."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "meta.json").exists():
            raise


# -----------------------------------------------------------------------------
# the validation split


def split_documents(n_docs: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train doc ids, val doc ids), both sorted: a fixed random share of documents, whatever the seed."""
    if n_docs < 2:
        raise UserError(f"the corpus has {n_docs} document(s); a train/validation split needs at least 2 (one JSON line per document)")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    order = np.random.default_rng(SPLIT_SEED).permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_stream(cache: TokenCache, doc_ids: np.ndarray) -> np.memmap:
    """The documents doc_ids concatenated, as a memmap cached beside the corpus (copied in bounded chunks)."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    target = cache.folder / f"docs-{hashlib.sha256(doc_ids.tobytes()).hexdigest()[:16]}.bin"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.tmp-", dir=cache.folder)
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
    train_tokens: int
    val_tokens: int
    train_items: int  # windows (packed) or documents (padded)
    val_items: int
    skipped_lines: int
    vocab_size: int  # len(tokenizer); the model's vocab_size must be at least this

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_datasets(data_cfg, tokenizer) -> tuple[PackedDataset | PaddedDataset, PackedDataset | PaddedDataset, DataInfo]:
    """(train, val, info) for a DataConfig: tokenize once (cached), split by document, pack or pad."""
    cache = open_token_cache(data_cfg.path, tokenizer, data_cfg.text_key, data_cfg.skip_bad_lines, data_cfg.cache_dir)
    train_ids, val_ids = split_documents(cache.n_docs, data_cfg.val_fraction)
    seq_len = data_cfg.seq_len
    if data_cfg.packing:
        train = PackedDataset(split_stream(cache, train_ids), seq_len)
        val = PackedDataset(split_stream(cache, val_ids), seq_len)
    else:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cache.meta["eos_id"]
        train = PaddedDataset(cache.tokens, cache.doc_offsets, train_ids, seq_len, pad_id)
        val = PaddedDataset(cache.tokens, cache.doc_offsets, val_ids, seq_len, pad_id)
    for name, ds, fix in [("training", train, "lower data.seq_len or data.val_fraction"), ("validation", val, "lower data.seq_len or raise data.val_fraction")]:
        if len(ds) == 0:
            raise UserError(f"the {name} split has {ds.n_tokens} tokens, fewer than one sequence of data.seq_len + 1 = {seq_len + 1}; {fix}, or use a larger corpus")
    info = DataInfo(
        data_digest=cache.meta["data_digest"], tokenizer_digest=cache.meta["tokenizer_digest"], cache_path=str(cache.folder),
        cache_hit=cache.hit, n_docs=cache.n_docs, n_train_docs=len(train_ids), n_val_docs=len(val_ids),
        train_tokens=cache.doc_tokens(train_ids), val_tokens=cache.doc_tokens(val_ids), train_items=len(train),
        val_items=len(val), skipped_lines=cache.meta["skipped_lines"], vocab_size=len(tokenizer),
    )
    return train, val, info


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
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def eval_batches(ds, batch_size: int, max_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first max_batches batches of ds, in order: the same validation data every time.

    The last batch is smaller when ds runs out first.
    """
    end = min(len(ds), batch_size * max_batches)
    for start in range(0, end, batch_size):
        yield ds.get_batch(np.arange(start, min(start + batch_size, end)))
