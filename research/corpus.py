"""Reading a corpus: which shards `data.path` names, their documents, and their digest.

`data.path` is a spec: one file, a folder of `.jsonl` / `.jsonl.gz` / `.parquet` shards (mixed
freely), a glob, or a list of these. It always resolves to the same ordered list of shards (folders and globs sorted by name, a
list in the order given), and every reader here works shard by shard, unit by unit (a block of JSONL
lines, a parquet row group: research/parquet.py), so memory never depends on the corpus size. No torch here: worker processes import this module cheaply.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import heapq
import json
import sys
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from research import parquet
from research.config import REPO_ROOT, resolve_path
from research.errors import UserError

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", parquet.SUFFIX)  # what a folder's shards are named; other files are skipped (and listed)
BLOCK_BYTES = 4 << 20  # bytes of whole lines read at a time: the unit of work handed to a tokenizing worker
SKIP_HINT = "or set data.skip_bad_lines=true to skip such lines"
PATH_HINT = "set data.path to a .jsonl, .jsonl.gz or .parquet file, a folder of them, a glob or a list"
_reported_skips: set[str] = set()  # folders whose skipped files were already listed (once per process)


# -----------------------------------------------------------------------------
# which shards


def resolve_shards(spec: Any) -> list[Path]:
    """The ordered shard files of a data.path spec; a spec that names nothing is a one-line UserError."""
    if isinstance(spec, (str, Path)):
        return _shards_of(str(spec))
    shards = [shard for item in spec for shard in _shards_of(str(item))]
    if not shards:
        raise UserError(f"data.path is an empty list; {PATH_HINT}")
    return shards


def _shards_of(item: str) -> list[Path]:
    if glob.has_magic(item):
        pattern = str(Path(item).expanduser())
        matches = glob.glob(pattern, recursive=True)
        if not matches and not Path(pattern).is_absolute():  # relative: the current folder first, then the repo, as resolve_path
            matches = glob.glob(str(REPO_ROOT / pattern), recursive=True)
        files = sorted(Path(p).resolve() for p in matches if Path(p).is_file())
        if not files:
            raise UserError(f"data.path glob '{item}' matches no files; {PATH_HINT}")
        return files
    path = resolve_path(item)
    if path.is_dir():
        return _folder_shards(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}; {PATH_HINT}")
    if not path.is_file():
        raise UserError(f"data path is not a file or folder: {path}; {PATH_HINT}")
    return [path]


def _folder_shards(folder: Path) -> list[Path]:
    """The .jsonl / .jsonl.gz / .parquet files directly in `folder`, sorted by name; anything else is listed once on stderr."""
    entries = sorted(folder.iterdir())
    shards = [p for p in entries if p.is_file() and p.name.endswith(SHARD_SUFFIXES) and not p.name.startswith(".")]
    skipped = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in shards]
    if not shards:
        found = f" (it holds only {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})" if skipped else ""
        raise UserError(f"data folder {folder} has no .jsonl, .jsonl.gz or .parquet files{found}; {PATH_HINT}")
    if skipped and str(folder) not in _reported_skips:
        _reported_skips.add(str(folder))
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        print(f"warning: data folder {folder}: skipped {len(skipped)} entries that are not .jsonl/.jsonl.gz/.parquet: {shown}", file=sys.stderr, flush=True)
    return shards


def describe(spec: Any) -> str:
    """The spec as the user wrote it, for messages: 'a.jsonl' or '[a.jsonl, shards/]'."""
    return str(spec) if isinstance(spec, (str, Path)) else "[" + ", ".join(str(s) for s in spec) + "]"


def data_digest(spec: Any) -> str:
    """16 hex digits identifying the corpus by content: one shard's sha256, or the sha256 of the ordered shard digests.

    Content, not name + size + mtime: a copy of the corpus on another machine has the same digest
    (runs log it, and resume/reproduce compare it), an edit that keeps size and mtime is still seen,
    and hashing (~1 GB/s) costs little next to tokenizing (a few MB/s per core). A single file keeps
    the digest it always had, so existing caches stay valid.
    """
    digests = [_file_digest(shard) for shard in resolve_shards(spec)]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# documents


@dataclass
class ReadStats:
    """What a pass over a corpus saw; filled in by iter_documents as it goes."""

    documents: int = 0
    skipped_lines: int = 0  # bad JSONL lines, or parquet rows whose text is null or not a string
    first_problem: str = ""  # the error the first skipped line would have raised
    text_bytes: int = 0  # parquet: UTF-8 bytes of the text column read (JSONL counts the bytes of its blocks)

    def bad(self, problem: str, skip_bad_lines: bool, count: int = 1) -> None:
        """`count` bad lines (rows) described by `problem`: a UserError, or with skip_bad_lines counted and skipped."""
        if not skip_bad_lines:
            raise UserError(problem)
        self.skipped_lines += count
        self.first_problem = self.first_problem or problem


def iter_documents(path: str | Path, text_key: str = "text", skip_bad_lines: bool = False, stats: ReadStats | None = None) -> Iterator[str]:
    """The text of each document of one .jsonl or .jsonl.gz file (gzip is told by its magic bytes) or .parquet file.

    Blank lines are ignored. A bad line (not UTF-8, not JSON, no `text_key`) or parquet row (null
    or not a string) stops the read with a UserError naming file and line (row), or with
    skip_bad_lines is skipped and counted in `stats`. A file without documents is a UserError.
    """
    path = resolve_path(str(path))
    stats = ReadStats() if stats is None else stats
    for start, block, _ in read_units(path, text_key):
        yield from unit_documents(path, start, block, text_key, skip_bad_lines, stats)
    if stats.documents == 0:
        raise UserError(no_documents_message(path, text_key, stats))


def read_units(path: Path, text_key: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes | int, int]]:
    """The units of work of one shard: (start, block, bytes of the file read so far).

    JSONL: start is the block's first line number and block about block_bytes of whole lines.
    Parquet: start is the row group's first row and block the row group's number (an int),
    read by whoever calls unit_documents, so that worker processes do the decoding.
    """
    if not parquet.is_parquet(path):
        yield from read_blocks(path, block_bytes)
        return
    groups = parquet.row_groups(path, text_key)
    for (group, first_row), position in zip(groups, parquet.group_positions(path, len(groups))):
        yield first_row, group, position


def unit_documents(path: Path, start: int, block: bytes | int, text_key: str, skip_bad_lines: bool, stats: ReadStats) -> Iterator[str]:
    """The documents of one unit from read_units."""
    if isinstance(block, int):
        return parquet.row_group_documents(path, block, start, text_key, skip_bad_lines, stats)
    return block_documents(block, start, path, text_key, skip_bad_lines, stats)


def no_documents_message(where: Any, text_key: str, stats: ReadStats) -> str:
    if stats.skipped_lines:
        return f"{where} has no usable documents: all {stats.skipped_lines} non-blank lines were bad (first: {stats.first_problem})"
    return f"{where} has no documents (it is empty or blank); point data.path at JSONL with one {{\"{text_key}\": ...}} per line, or parquet with a '{text_key}' column"


def block_documents(block: bytes, first_lineno: int, path: Path, text_key: str, skip_bad_lines: bool, stats: ReadStats) -> Iterator[str]:
    """The documents of a block of whole lines whose first line is line `first_lineno` of `path`."""
    lines = block.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for lineno, raw in enumerate(lines, start=first_lineno):
        if not raw.strip():
            continue
        text, problem = _parse_line(raw, lineno, path, text_key)
        if problem:
            stats.bad(problem, skip_bad_lines)
            continue
        stats.documents += 1
        yield text


def read_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes, int]]:
    """(number of the block's first line, about block_bytes of whole lines, bytes of the file read so far).

    Through gzip when the file starts with its magic bytes. A line longer than block_bytes
    makes one longer block. A truncated or corrupt gzip file is a UserError.
    """
    if not path.is_file():
        raise UserError(f"data file not found: {path}; {PATH_HINT}")
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    lineno, carry = 1, b""
    try:
        with open(path, "rb") as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if compressed else nullcontext(raw)) as f:
            while data := f.read(block_bytes):
                data = carry + data
                cut = data.rfind(b"\n") + 1
                block, carry = data[:cut], data[cut:]
                if block:
                    yield lineno, block, raw.tell()
                    lineno += block.count(b"\n")
            if carry:
                yield lineno, carry, raw.tell()
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(f"{path} is a truncated or corrupt gzip file (failed after line {lineno - 1}: {err}); re-create or re-download it") from None


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


# -----------------------------------------------------------------------------
# a random sample bounded in bytes, for training a tokenizer


def sample_texts(shards: list[Path], sample_bytes: int, text_key: str = "text", skip_bad_lines: bool = False,
                 stats: ReadStats | None = None, seed: int = 0, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """At least sample_bytes of UTF-8 text (or the whole corpus) drawn at random from all of its documents, in random order.

    Each document gets a random key from a generator seeded with (seed, shard number), and the
    sample is the documents of smallest key whose bytes reach sample_bytes (a bottom-k sample:
    uniform over the corpus, without replacement, the same for the same seed). Reads every shard
    once and holds no more than the sample (plus one document); progress(bytes read, documents)
    is called after each unit.
    """
    stats = ReadStats() if stats is None else stats
    heap: list[tuple[float, int, str]] = []  # (-key, bytes, text): the largest key on top, where it is dropped first
    kept, before = 0, 0
    for number, shard in enumerate(shards):
        rng = np.random.default_rng([seed, number])
        for start, block, position in read_units(shard, text_key):
            texts = list(unit_documents(shard, start, block, text_key, skip_bad_lines, stats))
            for key, text in zip(rng.random(len(texts)).tolist(), texts):
                if kept >= sample_bytes and -key <= heap[0][0]:
                    continue
                size = len(text.encode("utf-8"))
                heapq.heappush(heap, (-key, size, text))
                kept += size
                while kept - heap[0][1] >= sample_bytes:
                    kept -= heapq.heappop(heap)[1]
            if progress:
                progress(before + position, stats.documents)
        before += shard.stat().st_size
    if stats.documents == 0:
        raise UserError(no_documents_message(shards[0] if len(shards) == 1 else describe([str(s) for s in shards]), text_key, stats))
    return [text for _, _, text in sorted(heap, reverse=True)]


def total_size(shards: Iterable[Path]) -> int:
    return sum(shard.stat().st_size for shard in shards)
