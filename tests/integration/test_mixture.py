"""A weighted mixture of sources (data.sources): token shares held at the weights, metrics per source, and a killed
and resumed mixture run bitwise equal to an uninterrupted one."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from research.checkpoint import load_checkpoint
from research.config import REPO_ROOT, DataConfig, SourceConfig
from research.corpus import iter_documents
from research.errors import UserError
from research.mixture import MixtureSampler, build_sources, make_sampler
from research.tokenizer import load_tokenizer
from research.trainer import train

TANG_SONG = Path(__file__).parents[1] / "data" / "tang_song.jsonl"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """English as JSONL, Chinese as parquet under another column name: two sources of different token counts."""
    folder = tmp_path_factory.mktemp("sources")
    english = itertools.islice(iter_documents(REPO_ROOT / "data" / "shakespeare.jsonl.gz"), 300)
    (folder / "eng.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in english))
    pq.write_table(pa.table({"content": list(iter_documents(TANG_SONG))}), folder / "tang.parquet", row_group_size=100)
    return folder


def sources_cfg(corpora, weights=(0.75, 0.25)):
    return [{"name": "eng", "path": str(corpora / "eng.jsonl"), "weight": weights[0]},
            {"name": "tang", "path": str(corpora / "tang.parquet"), "weight": weights[1], "text_key": "content"}]


@pytest.mark.parametrize("packing", [True, False])
def test_token_shares_stay_at_the_weights_deterministically(corpora, tmp_path, packing):
    cfg = DataConfig(sources=[SourceConfig(**s) for s in sources_cfg(corpora, (3.0, 1.0))], cache_dir=str(tmp_path), seq_len=128, packing=packing)
    sources = build_sources(cfg, load_tokenizer("data/tokenizer"))
    assert [s.weight for s in sources] == [0.75, 0.25]  # normalized
    sampler = make_sampler(sources, batch_size=8, seed=3)
    assert isinstance(sampler, MixtureSampler)
    longest = max(s.train.row_tokens(i) for s in sources for i in range(len(s.train)))
    for _ in range(1000):  # more than two epochs of the smaller source
        batch = sampler.next_batch()
        assert batch["input_ids"].shape == (8, 128)
        assert all(abs(t - w * sum(sampler.tokens)) <= longest for t, w in zip(sampler.tokens, sampler.weights))  # within one row, always
    shares = sampler.shares()
    assert abs(shares["eng"] - 0.75) < 0.01 and abs(shares["tang"] - 0.25) < 0.01
    assert sampler.epoch[1] >= 2
    again = make_sampler(sources, batch_size=8, seed=3)
    for _ in range(1000):
        again.next_batch()
    assert again.state_dict() == sampler.state_dict() and torch.equal(again.next_batch()["input_ids"], sampler.next_batch()["input_ids"])
    ranks = [make_sampler(sources, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]  # two ranks: the one-process batch, split
    one = make_sampler(sources, batch_size=8, seed=3)
    assert torch.equal(torch.cat([r.next_batch()["input_ids"] for r in ranks]), one.next_batch()["input_ids"])
    with pytest.raises(UserError, match="resume with the data.sources"):
        one.load_state_dict({"epoch": 0, "cursor": 8})


def test_a_mixture_run_logs_each_source_and_resumes_bitwise(corpora, tmp_path, tiny_cfg, capsys):
    common = dict(data__sources=sources_cfg(corpora), tracking__enabled=False, train__max_steps=6, train__eval_every=3, train__checkpoint_every=3,
                  train__keep_checkpoints=0, train__sample_tokens=0, train__test_batches=2, model__num_hidden_layers=1, data__seq_len=16)
    whole = train(tiny_cfg(**common, train__checkpoint_dir=str(tmp_path / "whole")))
    printed = capsys.readouterr().out
    assert "source eng" in printed and "weight 0.75" in printed and "epochs" in printed and "source tang" in printed
    final = whole.final_metrics
    for split in ("val", "test"):
        for name in ("eng", "tang"):
            assert math.isfinite(final[f"{split}/loss/{name}"]) and math.isfinite(final[f"{split}/bpb/{name}"])
        assert min(final[f"{split}/loss/eng"], final[f"{split}/loss/tang"]) <= final[f"{split}/loss"] <= max(final[f"{split}/loss/eng"], final[f"{split}/loss/tang"])
    assert dict(whole.curve("val/bpb/tang"))[3] > 0
    assert final["train/share/eng"] == 0.75 and final["train/share/tang"] == 0.25  # 6 steps x 4 rows: 18 and 6 full windows

    resumed = train(tiny_cfg(**common, train__checkpoint_dir=str(tmp_path / "resumed"), train__resume_from=str(tmp_path / "whole" / "step_00000003.pt")))
    assert resumed.curve() == [(s, v) for s, v in whole.curve() if s > 3] and resumed.final_metrics == whole.final_metrics
    a = load_checkpoint(tmp_path / "whole" / "step_00000006.pt")["state"]
    b = load_checkpoint(tmp_path / "resumed" / "step_00000006.pt")["state"]
    assert a["data"] == b["data"] and set(a["data"]["sources"]) == {"eng", "tang"}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    tokens = {name: s["tokens"] for name, s in a["data"]["sources"].items()}
    assert tokens["eng"] == 3 * tokens["tang"]  # 6 steps x 4 rows x 16 tokens: 72 and 24 rows' worth
