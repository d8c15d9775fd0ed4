"""Reading parquet shards: the text column of one row group at a time.

A row group is the smallest part of a parquet file that can be read without the rest, so it is
the unit of work the cache builder hands to a worker, as a block of lines is for JSONL. Only the
`data.text_key` column is read. A null or non-string value is a bad row: counted and skipped under
`data.skip_bad_lines`, else a one-line error, as a bad JSONL line is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from research.errors import UserError

SUFFIX = ".parquet"
SKIP_HINT = "or set data.skip_bad_lines=true to skip such rows"


def is_parquet(path: Path) -> bool:
    return path.name.endswith(SUFFIX)


def open_parquet(path: Path):
    """The file's pyarrow ParquetFile (its footer read); an unreadable file is a one-line UserError naming it.

    pyarrow is imported here, on the first parquet file: a JSONL corpus never pays for it (0.4 s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} is not a readable parquet file ({first_line(err)}); re-create or re-download it") from None


def row_groups(path: Path, text_key: str) -> list[tuple[int, int]]:
    """(row group, its first row) of every row group; a file without the `text_key` column is a UserError listing the columns it has."""
    reader = open_parquet(path)
    names = reader.schema_arrow.names
    if text_key not in names:
        shown = ", ".join(repr(n) for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise UserError(f"{path} has no column '{text_key}' (its columns: {shown or 'none'}); set data.text_key to the column holding the text")
    groups, first_row = [], 0
    for group in range(reader.metadata.num_row_groups):
        groups.append((group, first_row))
        first_row += reader.metadata.row_group(group).num_rows
    return groups


def group_positions(path: Path, n_groups: int) -> list[int]:
    """Bytes of the file read once each row group is done (its share of the file size), for progress."""
    size = path.stat().st_size
    return [size * (g + 1) // max(n_groups, 1) for g in range(n_groups)]


def row_group_documents(path: Path, group: int, first_row: int, text_key: str, skip_bad_lines: bool, stats: Any) -> Iterator[str]:
    """The texts of row group `group` (whose first row is `first_row`) of `path`; bad rows stop the read or are counted in `stats`."""
    import pyarrow as pa

    try:
        column = open_parquet(path).read_row_group(group, columns=[text_key]).column(0)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: row group {group} cannot be read ({first_line(err)}); re-create or re-download the file") from None
    stats.text_bytes += _utf8_bytes(column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_string_view(column.type)):
        problem = (f"column '{text_key}' of {path} holds {column.type}, not strings; set data.text_key to a string column {SKIP_HINT}")
        stats.bad(problem, skip_bad_lines, len(column))
        return
    texts = column.to_pylist()
    if column.null_count:
        row = first_row + texts.index(None)
        stats.bad(f"row {row} of {path}: '{text_key}' is null, not a string; drop or fill such rows {SKIP_HINT}", skip_bad_lines, column.null_count)
        texts = [t for t in texts if t is not None]
    stats.documents += len(texts)
    yield from texts


def first_line(err: Exception) -> str:
    """The first line of an error's message (pyarrow's run over several), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _utf8_bytes(column) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return int(pc.sum(pc.binary_length(column)).as_py() or 0)
    except pa.ArrowNotImplementedError:  # not a string column: it has no text bytes
        return 0
