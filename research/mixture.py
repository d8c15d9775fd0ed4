"""A weighted mixture of data sources (`data.sources`): each cached and split on its own, batches shared by weight.

Each source is a corpus of its own (its own token cache, its own validation and test documents).
Every row of a training batch is given to the source whose share of the tokens drawn so far lags
its weight the most, so each source's share stays within one sequence of its weight at every step;
which row a source gives comes from its own seeded permutation, epoch after epoch, independently of
the others. The sampler's state is each source's epoch, cursor and tokens drawn: small, exact, and
in every checkpoint, so a resumed mixture draws the very batches the uninterrupted run draws.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from research.corpus import data_digest
from research.data import BatchSampler, DataInfo, Dataset, build_datasets
from research.errors import UserError


@dataclass
class Source:
    """One source's datasets: what it trains on, and its own validation and test documents."""

    name: str
    weight: float  # normalized: the weights of a mixture sum to 1
    train: Dataset
    val: Dataset
    test: Dataset | None
    info: DataInfo


def build_sources(data_cfg, tokenizer) -> list[Source]:
    """data.sources, each built as data.path would be (tokenized once, cached, split by document); or data.path alone, unnamed."""
    if not data_cfg.sources:
        train, val, test, info = build_datasets(data_cfg, tokenizer)
        return [Source("", 1.0, train, val, test, info)]
    total = sum(float(s.weight) for s in data_cfg.sources)
    sources = []
    for spec in data_cfg.sources:
        one = copy.deepcopy(data_cfg)
        one.path, one.text_key, one.sources = spec.path, spec.text_key or data_cfg.text_key, []
        train, val, test, info = build_datasets(one, tokenizer)
        sources.append(Source(spec.name, float(spec.weight) / total, train, val, test, info))
    return sources


def combined_info(sources: list[Source]) -> DataInfo:
    """The mixture's DataInfo: counts summed, and a digest of every source's name, weight and data digest (what resume checks)."""
    if len(sources) == 1 and not sources[0].name:
        return sources[0].info
    infos = [s.info for s in sources]
    summed = {key: sum(getattr(i, key) for i in infos) for key in ("n_docs", "n_train_docs", "n_val_docs", "n_test_docs", "train_tokens",
                                                                  "val_tokens", "test_tokens", "train_items", "val_items", "skipped_lines")}
    return DataInfo(data_digest=mixture_digest([(s.name, s.weight, s.info.data_digest) for s in sources]), tokenizer_digest=infos[0].tokenizer_digest,
                    cache_path=", ".join(i.cache_path for i in infos), cache_hit=all(i.cache_hit for i in infos), vocab_size=infos[0].vocab_size,
                    sources=[{"name": s.name, "weight": s.weight, "train_tokens": s.info.train_tokens} for s in sources], **summed)


def mixture_digest(parts: list[tuple[str, float, str]]) -> str:
    """16 hex digits over each source's (name, normalized weight, data digest): another weight or source is other data."""
    identity = "\n".join(f"{name}:{weight!r}:{digest}" for name, weight, digest in parts)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def config_data_digest(data_cfg) -> str:
    """The digest a run logs for its data (the tag data.digest), from the config alone: data.path's, or the mixture's."""
    if not data_cfg.sources:
        return data_digest(data_cfg.path)
    total = sum(float(s.weight) for s in data_cfg.sources)
    return mixture_digest([(s.name, float(s.weight) / total, data_digest(s.path)) for s in data_cfg.sources])


def mixture_shares(sampler) -> dict[str, float]:
    """{train/share/<name>: share of the training tokens drawn} of a mixture's sampler; {} for one source."""
    return {f"train/share/{name}": share for name, share in sampler.shares().items()} if isinstance(sampler, MixtureSampler) else {}


def make_sampler(sources: list[Source], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """The training sampler: a BatchSampler for one source (as runs before mixtures drew), a MixtureSampler for several."""
    if len(sources) == 1:
        return BatchSampler(sources[0].train, batch_size, seed=seed, rank=rank, world_size=world_size)
    return MixtureSampler(sources, batch_size, seed, rank, world_size)


def source_lines(info: DataInfo, total_tokens: int) -> dict[str, str]:
    """What the run prints for each source at its start: training tokens, weight, and the epochs the run makes over it."""
    return {f"source {s['name']}": f"{s['train_tokens']:,} train tokens, weight {s['weight']:.3g}, "
                                   f"{s['weight'] * total_tokens / max(1, s['train_tokens']):.3g} epochs" for s in info.sources}


class MixtureSampler:
    """Training batches from several sources, each source's share of the tokens held at its weight; resumable and sliced per rank.

    Each step draws batch_size * world_size rows one by one: a row goes to the source with the largest
    weight * (tokens drawn + its tokens) - source's tokens drawn, and is that source's next sequence
    (epoch e of source k visits default_rng([seed, k, e]).permutation). Rank r keeps its contiguous slice.
    """

    def __init__(self, sources: list[Source], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.sources, self.batch_size, self.seed, self.rank, self.world_size = sources, batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.weights = np.array([s.weight for s in sources])
        self.epoch, self.cursor = [0] * len(sources), [0] * len(sources)
        self.tokens = [0] * len(sources)  # training tokens drawn from each source (all ranks)
        self._orders = [self._permutation(k, 0) for k in range(len(sources))]

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, k, epoch]).permutation(len(self.sources[k].train))

    def _next_row(self, k: int) -> int:
        if self.cursor[k] >= len(self._orders[k]):
            self.epoch[k], self.cursor[k] = self.epoch[k] + 1, 0
            self._orders[k] = self._permutation(k, self.epoch[k])
        self.cursor[k] += 1
        return int(self._orders[k][self.cursor[k] - 1])

    def next_rows(self) -> list[tuple[int, int]]:
        """This rank's (source, row) pairs of the next step; every rank draws the whole step, so all stay in step."""
        rows = []
        for _ in range(self.global_batch):
            total = sum(self.tokens)
            heads = [self._peek_tokens(k) for k in range(len(self.sources))]
            lag = self.weights * (total + np.array(heads)) - np.array(self.tokens)
            k = int(np.argmax(lag))
            row = self._next_row(k)
            self.tokens[k] += heads[k]
            rows.append((k, row))
        return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def _peek_tokens(self, k: int) -> int:
        """Target tokens of source k's next row (a full window when packed)."""
        order, cursor = self._orders[k], self.cursor[k]
        row = int(order[cursor]) if cursor < len(order) else int(self._permutation(k, self.epoch[k] + 1)[0])
        return self.sources[k].train.row_tokens(row)

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = self.next_rows()
        parts, where = [], []
        for k in range(len(self.sources)):
            mine = [i for i, (source, _) in enumerate(rows) if source == k]
            if mine:
                parts.append(self.sources[k].train.get_batch([rows[i][1] for i in mine]))
                where += mine
        order = torch.from_numpy(np.argsort(np.array(where), kind="stable"))
        return {key: torch.cat([p[key] for p in parts])[order] for key in parts[0]}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def shares(self) -> dict[str, float]:
        """Each source's share of the training tokens drawn so far."""
        return {s.name: t / max(1, sum(self.tokens)) for s, t in zip(self.sources, self.tokens)}

    def state_dict(self) -> dict[str, Any]:
        return {"sources": {s.name: {"epoch": e, "cursor": c, "tokens": t} for s, e, c, t in zip(self.sources, self.epoch, self.cursor, self.tokens)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("sources", {})
        if sorted(saved) != sorted(s.name for s in self.sources):
            raise UserError(f"the checkpoint's data position is for sources {sorted(saved) or 'none (a single data.path)'}, this run has "
                            f"{sorted(s.name for s in self.sources)}; resume with the data.sources the run was started with")
        for k, source in enumerate(self.sources):
            own = saved[source.name]
            self.epoch[k], self.cursor[k], self.tokens[k] = int(own["epoch"]), int(own["cursor"]), int(own["tokens"])
            self._orders[k] = self._permutation(k, self.epoch[k])
