"""How fast the token cache builds: a generated sharded corpus, one worker and every core, against a plain tokenizer pass.

The corpus is shuffled copies of data/shakespeare.jsonl.gz's documents, written as gzip JSONL shards
and, document for document the same, as parquet shards (pyarrow's defaults, snappy, with row groups
of PARQUET_ROW_GROUP documents), under the system temp folder (kept for the next run, never in the repo). Each measurement runs in
its own process, with torch imported as in training, and is timed inside it; its peak memory is
the largest process's maximum RSS (wait4) and the sum of RSS over its process tree, sampled.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from research.bench_metrics import slug
from research.config import REPO_ROOT, resolve_path
from research.corpus import iter_documents
from research.hardware import cpu_name
from research.token_cache import resolve_workers

SOURCE = REPO_ROOT / "data" / "shakespeare.jsonl.gz"
PARQUET_ROW_GROUP = 5000  # documents per row group of the parquet shards: ~10 MB of text, a unit of work like a 4 MB JSONL block
FORMAT_NAMES = {"jsonl": "JSONL", "parquet": "parquet"}

MEASURE = r"""
import json, os, resource, sys, time, itertools
mode, corpus, tokenizer_dir, cache_dir, workers = sys.argv[1:6]
from research.corpus import iter_documents, resolve_shards
from research.token_cache import open_token_cache
from research.tokenizer import load_tokenizer
tokenizer = load_tokenizer(tokenizer_dir)
def cpu():  # this process and its waited-for workers
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))
if mode == "build":
    start, start_cpu = time.perf_counter(), cpu()
    cache = open_token_cache(corpus, tokenizer, cache_dir=cache_dir, workers=int(workers))
    result = {"seconds": time.perf_counter() - start, "tokens": cache.meta["n_tokens"], "documents": cache.n_docs, "cpu_s": cpu() - start_cpu}
else:  # one thread, texts already in memory: only the tokenizer(batch) calls are timed
    seconds = cpu = tokens = documents = 0
    for shard in resolve_shards(corpus):
        docs = iter_documents(shard)
        while batch := list(itertools.islice(docs, 256)):
            start, start_cpu = time.perf_counter(), time.thread_time()
            ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            seconds, cpu = seconds + time.perf_counter() - start, cpu + time.thread_time() - start_cpu
            tokens += sum(len(x) + 2 for x in ids)
            documents += len(batch)
    result = {"seconds": seconds, "tokens": tokens, "documents": documents, "cpu_s": cpu}
print("RESULT " + json.dumps(result), flush=True)
"""


def make_corpus(megabytes: int, shards: int, seed: int, fmt: str = "jsonl") -> tuple[Path, dict]:
    """`shards` gzip JSONL (or parquet) shards holding about `megabytes` MB of JSONL in all; reused when already there.

    The parquet shards hold the very documents of the JSONL shards, in the same order."""
    folder = Path(tempfile.gettempdir()) / "minilm-bench-data" / f"{megabytes}mb-{shards}shards-seed{seed}{'-parquet' if fmt == 'parquet' else ''}"
    done = folder.with_suffix(".json")  # beside the shards, not among them
    if done.exists():
        info = json.loads(done.read_text())
        return folder, {**info, "file_bytes": info.get("file_bytes", info.get("gzip_bytes", 0))}  # gzip_bytes: corpora written before parquet
    folder.mkdir(parents=True, exist_ok=True)
    texts = list(iter_documents(SOURCE))
    lines = [(json.dumps({"text": t}) + "\n").encode() for t in texts]
    target, total, docs = megabytes * 1_000_000 / shards, 0, 0
    for i in range(shards):
        rng, written, chosen = np.random.default_rng([seed, i]), 0, []
        while written < target:
            for j in rng.permutation(len(lines)):
                chosen.append(j)
                written += len(lines[j])
                if written >= target:
                    break
        if fmt == "parquet":
            pq.write_table(pa.table({"text": [texts[j] for j in chosen]}), folder / f"shard-{i:05d}.parquet", row_group_size=PARQUET_ROW_GROUP)
        else:
            with gzip.open(folder / f"shard-{i:05d}.jsonl.gz", "wb", compresslevel=1) as f:
                f.writelines(lines[j] for j in chosen)
        total, docs = total + written, docs + len(chosen)
    info = {"jsonl_bytes": total, "documents": docs, "shards": shards, "format": fmt,
            "file_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("shard-"))}
    done.write_text(json.dumps(info))
    return folder, info


def measure(mode: str, corpus: Path, tokenizer_dir: str, workers: int, console: Console) -> dict:
    """Run one measurement in a fresh process; its progress lines are shown as they come."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=corpus.parent) as cache_dir:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.Popen([sys.executable, "-c", MEASURE, mode, str(corpus), tokenizer_dir, cache_dir, str(workers)],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        sampler = TreeRss(proc.pid)
        result = {}
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                console.print(f"  {line.rstrip()}", highlight=False, soft_wrap=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"{mode} measurement failed with exit status {proc.returncode}")
    return result | {"max_rss_mb": usage.ru_maxrss / 1024, "tree_rss_mb": sampler.peak / 2**20}


class TreeRss:
    """Peak of the summed RSS of a process and its descendants, sampled every 0.2 s from /proc (Linux)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.running = pid, 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(self.pid)))
            time.sleep(0.2)

    def stop(self) -> None:
        self.running = False
        self.thread.join()


def _tree(pid: int) -> list[int]:
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return [pid]
    return [pid] + [d for c in children for d in _tree(c)]


def _rss(pid: int) -> int:
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def run_data_bench(cfg) -> list[dict]:
    """Measure, print a table and write <bench.out>/data-<machine>.md."""
    console, cores = Console(), resolve_workers(cfg.data.workers)
    corpora = {fmt: make_corpus(cfg.bench.data_mb, cfg.bench.data_shards, cfg.seed, fmt) for fmt in cfg.bench.data_formats}
    for fmt, (corpus, info) in corpora.items():
        console.print(f"corpus {corpus}: {info['shards']} {FORMAT_NAMES[fmt]} shards of {info['jsonl_bytes'] / 1e6:,.0f} MB of JSONL "
                      f"({info['file_bytes'] / 1e6:,.0f} MB of files), {info['documents']:,} documents")
    load_before = os.getloadavg()
    rows = []
    first = next(iter(corpora))
    plan = [(first, "tokenizer(batch), 1 thread", "reference", 1)] if cfg.bench.data_reference else []
    plan += [(fmt, f"{FORMAT_NAMES[fmt]}: cache build, {w} worker(s)", "build", w) for fmt in corpora for w in sorted({1, cores})]
    for fmt, label, mode, workers in plan:
        console.print(f"[bold]{label}[/]")
        rows.append({"label": label, "format": fmt, "mode": mode, "workers": workers, **measure(mode, corpora[fmt][0], cfg.data.tokenizer, workers, console)})
    reference = rows[0] if cfg.bench.data_reference else None
    info = corpora[first][1]
    for row in rows:
        one = next(r for r in rows if r["mode"] == "build" and r["format"] == row["format"])
        row["mb_s"] = info["jsonl_bytes"] / 1e6 / row["seconds"]
        row["tokens_s"] = row["tokens"] / row["seconds"]
        row["vs_one"] = one["seconds"] / row["seconds"]
        row["vs_reference"] = reference["seconds"] / row["seconds"] if reference else float("nan")
    section = render(rows, {fmt: i for fmt, (_, i) in corpora.items()}, load_before, os.getloadavg())
    Console(width=max(console.width, 150)).print(table(rows))
    out = resolve_path(cfg.bench.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"data-{cfg.bench.machine or slug(f'{cpu_name()} {cores} cores', '-')}.md"
    write_report(path, section, cores)
    console.print(f"report: {path}")
    return rows


COLUMNS = ["what", "seconds", "CPU seconds", "MB/s of JSONL", "tokens/s", "× 1 worker", "× tokenizer pass", "peak RSS, largest process (MB)", "peak RSS, all processes (MB)"]


def cells(row: dict) -> list[str]:
    return [row["label"], f"{row['seconds']:.1f}", f"{row['cpu_s']:.1f}", f"{row['mb_s']:.2f}", f"{row['tokens_s']:,.0f}", f"{row['vs_one']:.2f}",
            f"{row['vs_reference']:.2f}" if row["vs_reference"] == row["vs_reference"] else "–", f"{row['max_rss_mb']:,.0f}", f"{row['tree_rss_mb']:,.0f}"]


def table(rows: list[dict]) -> Table:
    out = Table(*COLUMNS)
    for row in rows:
        out.add_row(*cells(row))
    return out


def render(rows: list[dict], infos: dict[str, dict], load_before, load_after) -> str:
    """One report section: the corpus in each format, how it was measured, the table, and parquet's time against JSONL's."""
    info = next(iter(infos.values()))
    formats = " and ".join(f"{i['shards']} {'gzip JSONL' if fmt == 'jsonl' else 'parquet'} shards ({i['file_bytes'] / 1e6:,.0f} MB of files)" for fmt, i in infos.items())
    lines = [
        section_title(info["jsonl_bytes"], info["shards"], list(infos)), "",
        f"Measured {date.today()} by `python run.py exp=bench_data bench.data_mb={info['jsonl_bytes'] // 1_000_000} bench.data_shards={info['shards']} "
        f"bench.data_formats=[{','.join(infos)}]` ({info['documents']:,} documents, shuffled copies of data/shakespeare.jsonl.gz, as {formats}; "
        f"parquet row groups of {PARQUET_ROW_GROUP:,} documents). Load average (1 min) {load_before[0]:.2f} before and {load_after[0]:.2f} after.", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    builds = {(r["format"], r["workers"]): r for r in rows if r["mode"] == "build"}
    pairs = [(w, builds[("parquet", w)], builds[("jsonl", w)]) for f, w in builds if f == "jsonl" and ("parquet", w) in builds]
    if pairs:  # CPU seconds too: on a machine shared with other work, wall time also measures the others
        lines += ["", "Parquet / JSONL, the same text: " + ", ".join(f"{p['seconds'] / j['seconds']:.2f} of the time and {p['cpu_s'] / j['cpu_s']:.2f} "
                                                                     f"of the CPU seconds with {w} worker(s)" for w, p, j in pairs) + "."]
    return "\n".join(lines) + "\n"


def section_title(jsonl_bytes: int, shards: int, formats: list[str]) -> str:
    title = f"## {jsonl_bytes / 1e6:,.0f} MB of JSONL in {shards} gzip shards"
    if formats == ["jsonl"]:
        return title
    if formats == ["parquet"]:
        return f"## {jsonl_bytes / 1e6:,.0f} MB of JSONL as {shards} parquet shards"
    return title + ", and as parquet"


def write_report(path: Path, section: str, cores: int) -> None:
    """Add or replace this corpus size's section of the report, keeping the others."""
    title = section.splitlines()[0]
    old = path.read_text().split("\n## ")[1:] if path.exists() else []
    sections = ["## " + s.rstrip("\n") + "\n" for s in old if not ("## " + s).startswith(title + "\n")] + [section]
    header = (
        f"# Token cache build on {cpu_name()}, {cores} cores\n\n"
        "Each row ran in its own process, with torch imported as in training. `tokenizer(batch)` is the transformers call on "
        "batches of 256 texts already in memory (reading not timed), on one thread; a cache build reads, decompresses, parses "
        "and tokenizes the shards (a parquet build: reads and decodes the row groups' text column) and writes the cache. MB/s of JSONL: "
        "the size of the text as JSONL over the seconds, for parquet rows too (the same text). CPU seconds: of the timed calls (the tokenizer pass), or of the build "
        "process and its workers (a build); their ratio to seconds shows how much CPU a row got on a machine shared with other "
        "work. Peak RSS: the largest single process (start-up included), and the sum over the process tree, sampled every 0.2 s.\n"
    )
    path.write_text(header + "\n" + "\n".join(sections))
