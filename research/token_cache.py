"""The token cache: a corpus tokenized once, on every core, into files that later runs memory-map.

    <cache_dir>/<key>/tokens.bin        every document as [bos] + ids + [eos], flat, uint16 or uint32
    <cache_dir>/<key>/doc_offsets.npy   int64, document d is tokens[offsets[d]:offsets[d + 1]]
    <cache_dir>/<key>/meta.json         what was tokenized with what (deterministic)
    <cache_dir>/<key>/build.json        how long it took, with how many workers

The parent reads JSONL shards in blocks of whole lines (decompressing gzip once), and lists the row
groups of parquet shards, and hands these units to `data.workers` processes (which read a row group
themselves, so the parquet decoding is parallel too), each running the Rust tokenizer on one thread; it writes their results
in unit order. So the cache is byte-identical for any number of workers, and memory is bounded
by the blocks in flight (2 per worker), not by the corpus. The cache is built in a temp folder
and renamed into place: a crash, Ctrl-C or kill never leaves a cache a later run would trust, and
temp folders of killed builds are removed by the next build.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from research.config import resolve_path
from research.corpus import BLOCK_BYTES, ReadStats, data_digest, describe, no_documents_message, read_units, resolve_shards, total_size, unit_documents
from research.errors import UserError
from research.progress import WorkProgress, format_seconds
from research.tokenizer import CREATE_HINT, tokenizer_digest

CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are not misread
TOKENIZE_CHUNK = 256  # documents per tokenizer call
IN_FLIGHT_PER_WORKER = 2  # blocks queued or being tokenized per worker: what bounds the parent's memory
COPY_CHUNK = 1 << 24  # elements per copy when moving arrays between files


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


def resolve_workers(workers: int) -> int:
    """data.workers: 0 means one per CPU core this process may use."""
    from research.hardware import usable_cores  # hardware imports torch; this module otherwise does not

    return workers if workers > 0 else usable_cores()


def open_token_cache(path: Any, tokenizer, text_key: str = "text", skip_bad_lines: bool = False, cache_dir: str | Path = "results/cache",
                     workers: int = 0, block_bytes: int = BLOCK_BYTES) -> TokenCache:
    """Load the cache for (data, tokenizer, text_key), building it first if there is none. `path` is a data.path spec."""
    shards = resolve_shards(path)
    digest, tok_digest = data_digest(shards), tokenizer_digest(tokenizer)
    folder = resolve_path(str(cache_dir)) / cache_key(digest, tok_digest, text_key)
    hit = (folder / "meta.json").exists()
    if not hit:
        job = TokenizeJob(tokenizer, text_key, skip_bad_lines)
        _build_cache(folder, path, shards, job, {"data_digest": digest, "tokenizer_digest": tok_digest}, resolve_workers(workers), block_bytes)
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    doc_offsets = np.load(folder / "doc_offsets.npy")
    if meta.get("format") != CACHE_FORMAT or len(tokens) != doc_offsets[-1] or len(doc_offsets) != meta["n_docs"] + 1:
        raise UserError(f"token cache {folder} is inconsistent (edited or from another version); delete that folder and run again")
    if meta["skipped_lines"] and not skip_bad_lines:
        raise UserError(meta["first_problem"])  # the cache was built with skipping on; stay as strict as a fresh read
    return TokenCache(folder, tokens, doc_offsets, meta, hit)


# -----------------------------------------------------------------------------
# building


def _build_cache(folder: Path, spec: Any, shards: list[Path], job: TokenizeJob, digests: dict, workers: int, block_bytes: int) -> None:
    """Tokenize every document into a temp folder, then rename it into place: a crash never leaves half a cache."""
    start = time.time()
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache is as readable as any other output
    if total_size(shards) < block_bytes // 4:
        workers = 1  # a single block: nothing to share out
    try:
        stats, n_tokens, jsonl_bytes = _write_tokens(tmp, shards, job, workers, block_bytes)
        if stats.documents == 0:
            raise UserError(no_documents_message(describe(spec), job.text_key, stats))
        _offsets_to_npy(tmp / "offsets.raw", tmp / "doc_offsets.npy", stats.documents + 1)
        meta = {
            "format": CACHE_FORMAT, "data_path": str(shards[0]) if isinstance(spec, (str, Path)) and len(shards) == 1 else describe(spec),
            **digests, "text_key": job.text_key, "vocab_size": job.vocab_size, "dtype": job.dtype.name, "bos_id": job.bos,
            "eos_id": job.eos, "n_docs": stats.documents, "n_tokens": n_tokens, "skipped_lines": stats.skipped_lines,
            "first_problem": stats.first_problem, "jsonl_bytes": jsonl_bytes, "shards": [str(s) for s in shards],
        }
        seconds = time.time() - start
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "build.json").write_text(json.dumps({"build_seconds": round(seconds, 3), "workers": workers}, indent=1))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"token cache built in {format_seconds(seconds)} with {workers} worker(s): {stats.documents:,} documents from {len(shards)} shard(s) "
          f"({jsonl_bytes / 1e6:,.1f} MB of JSONL lines and parquet text), {n_tokens:,} tokens ({n_tokens / max(seconds, 1e-9):,.0f}/s), "
          f"{size / 1e6:,.1f} MB at {folder}", flush=True)


def _write_tokens(tmp: Path, shards: list[Path], job: TokenizeJob, workers: int, block_bytes: int) -> tuple[ReadStats, int, int]:
    """Stream every block's tokens to tmp/tokens.bin and its document ends to tmp/offsets.raw, in block order."""
    stats, n_tokens, jsonl_bytes = ReadStats(), 0, 0
    with open(tmp / "tokens.bin", "wb") as tokens, open(tmp / "offsets.raw", "wb") as offsets:
        offsets.write(np.zeros(1, dtype=np.int64).tobytes())
        with _worker_pool(job, workers) as pool, WorkProgress("tokenizing", total_size(shards), "tokens") as progress:
            for done, (block_tokens, lengths, part, n_bytes) in _ordered_results(pool, job, _blocks(shards, job.text_key, block_bytes), workers):
                tokens.write(block_tokens)
                offsets.write((n_tokens + np.cumsum(lengths, dtype=np.int64)).tobytes())
                n_tokens += int(lengths.sum())
                jsonl_bytes += n_bytes
                stats.documents += part.documents
                stats.skipped_lines += part.skipped_lines
                stats.first_problem = stats.first_problem or part.first_problem
                progress.update(done, n_tokens)
    return stats, n_tokens, jsonl_bytes


def _blocks(shards: list[Path], text_key: str, block_bytes: int) -> Iterator[tuple[int, tuple[Path, int, bytes]]]:
    """(bytes of the shard files read so far, (shard, start, block)) over all shards in order: see corpus.read_units."""
    before = 0
    for shard in shards:
        for start, block, pos in read_units(shard, text_key, block_bytes):
            yield before + pos, (shard, start, block)
        before += shard.stat().st_size


def _ordered_results(pool, job: TokenizeJob, blocks, workers: int) -> Iterator[tuple[int, tuple]]:
    """Each block's tokenize result in block order, with at most IN_FLIGHT_PER_WORKER blocks per worker pending."""
    if pool is None:
        encoder = Encoder(job)
        for done, args in blocks:
            yield done, encoder(*args)
        return
    pending: deque = deque()
    try:
        for done, args in blocks:
            pending.append((done, pool.submit(_encode_in_worker, args)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                done, result = pending.popleft()
                yield done, result.result()
        while pending:
            done, result = pending.popleft()
            yield done, result.result()
    except BrokenProcessPool:
        raise UserError(f"a tokenizing worker process died (killed, or out of memory); try again, with fewer data.workers (had {workers})") from None


def _offsets_to_npy(raw: Path, target: Path, n: int) -> None:
    """tmp/offsets.raw (raw int64) -> doc_offsets.npy, copied in bounded chunks (same bytes as np.save)."""
    source = np.memmap(raw, dtype=np.int64, mode="r", shape=(n,))
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.int64, shape=(n,))
    for lo in range(0, n, COPY_CHUNK):
        out[lo:lo + COPY_CHUNK] = source[lo:lo + COPY_CHUNK]
    out.flush()
    del out, source
    raw.unlink()


def _publish(tmp: Path, folder: Path) -> None:
    """Rename tmp to folder; if another process got there first, keep theirs (same inputs, same content)."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "meta.json").exists():
            raise


# -----------------------------------------------------------------------------
# tokenizing a block, in a worker process or in this one


@dataclass
class TokenizeJob:
    """What every block is tokenized with; handed to each worker once, when it starts."""

    tokenizer: Any
    text_key: str
    skip_bad_lines: bool

    def __post_init__(self):
        self.vocab_size = len(self.tokenizer)
        self.dtype = token_dtype(self.vocab_size)
        self.bos, self.eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if self.bos is None or self.eos is None:
            raise UserError(f"the tokenizer has no {'bos' if self.bos is None else 'eos'} token; {CREATE_HINT}")


class Encoder:
    """Block of JSONL lines, or parquet row group -> (tokens as bytes, document lengths, ReadStats, bytes read).

    Fast tokenizers are called through their Rust backend's encode_batch_fast (the ids of
    `tokenizer(texts, add_special_tokens=False)`, without the offsets nobody uses here).
    """

    def __init__(self, job: TokenizeJob):
        self.job = job
        backend = getattr(job.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend = type(backend).from_str(backend.to_str())  # a private copy: no truncation or padding left set by others
            backend.no_truncation()
            backend.no_padding()
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            self.encode = lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
        else:
            self.encode = lambda texts: job.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def __call__(self, path: Path, start: int, block: bytes | int) -> tuple[bytes, np.ndarray, ReadStats, int]:
        job, stats, parts, lengths = self.job, ReadStats(), [], []
        docs = unit_documents(path, start, block, job.text_key, job.skip_bad_lines, stats)
        while batch := list(itertools.islice(docs, TOKENIZE_CHUNK)):
            ids = self.encode(batch)
            sizes = [len(doc) + 2 for doc in ids]
            flat = itertools.chain.from_iterable(part for doc in ids for part in ((job.bos,), doc, (job.eos,)))
            parts.append(np.fromiter(flat, dtype=job.dtype, count=sum(sizes)))
            lengths += sizes
        tokens = np.concatenate(parts).tobytes() if parts else b""
        return tokens, np.asarray(lengths, dtype=np.int64), stats, stats.text_bytes if isinstance(block, int) else len(block)


_ENCODER: Encoder | None = None  # a worker process's encoder, made once by _init_worker


def _init_worker(job: TokenizeJob, parent_pid: int) -> None:
    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it shuts the pool down
    _die_with_parent(parent_pid)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker: the workers are the parallelism
    _ENCODER = Encoder(job)


def _encode_in_worker(args: tuple[Path, int, bytes | int]):
    return _ENCODER(*args)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this worker when the parent dies (killed builds leave no idle workers behind)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@contextmanager
def _worker_pool(job: TokenizeJob, workers: int):
    """A pool of `workers` processes, or None for one (then blocks are tokenized here, on one Rust thread).

    Forked where the platform can: a fork starts in milliseconds even with torch imported, while
    spawn re-imports the parent's modules, torch included, in every worker before it does any work.
    """
    if workers <= 1:
        with env_var("TOKENIZERS_PARALLELISM", "false"):
            yield None
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(job, os.getpid()))
    try:
        pool.submit(os.getpid).result()  # start the workers now, before a progress bar starts its thread
        yield pool
    finally:  # on an error or Ctrl-C: drop queued blocks, let the ones being tokenized finish (seconds)
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def env_var(name: str, value: str):
    """Set an environment variable for the duration of a with-block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# -----------------------------------------------------------------------------
# temp files of killed builds


def temp_prefix(name: str) -> str:
    """Temp name prefix carrying its owner (pid@host), so a later build can tell a live build's from a dead one's."""
    return f"{name}.tmp-{os.getpid()}@{socket.gethostname()}-"


def clean_stale_temps(folder: Path) -> None:
    """Remove temp folders and files in `folder` whose building process (on this host) is gone."""
    host = socket.gethostname()
    for path in folder.glob("*.tmp-*"):
        owner = path.name.partition(".tmp-")[2]
        pid, _, rest = owner.partition("@")
        if not (pid.isdigit() and rest.startswith(host + "-")) or _alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
