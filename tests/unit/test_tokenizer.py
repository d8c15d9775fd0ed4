"""The tokenizer trains deterministically, round-trips any text, and loads through AutoTokenizer."""

import ast
import itertools
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from research.config import REPO_ROOT
from research.corpus import iter_documents
from research.errors import UserError
from research.tokenizer import (
    BOS_ID, BOS_TOKEN, EOS_ID, EOS_TOKEN, PAD_ID, PAD_TOKEN, load_tokenizer, tokenizer_digest, tokens_per_char, train_tokenizer,
)

SHAKESPEARE = REPO_ROOT / "data" / "shakespeare.jsonl.gz"
TANG_SONG = Path(__file__).parents[1] / "data" / "tang_song.jsonl"


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory) -> Path:
    texts = list(itertools.islice(iter_documents(SHAKESPEARE), 120))
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "slice.jsonl", texts)


@pytest.fixture(scope="module")
def small_tokenizer(shakespeare_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(iter_documents(shakespeare_slice), out, vocab_size=800), out


def test_special_tokens_have_ids_0_1_2(small_tokenizer):
    tokenizer, _ = small_tokenizer
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]) == [0, 1, 2]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 800
    assert tokenizer("ROMEO:", add_special_tokens=False)["input_ids"][0] > 2  # plain text never maps to a special id


def test_saved_folder_loads_with_autotokenizer(small_tokenizer, shakespeare_slice):
    tokenizer, folder = small_tokenizer
    loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = next(iter_documents(shakespeare_slice))
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert loaded.model_max_length >= 1_000_000
    assert tokenizer_digest(loaded) == tokenizer_digest(folder) == tokenizer_digest(tokenizer)


def test_non_ascii_round_trip(tmp_path, small_tokenizer):
    tokenizer = train_tokenizer(iter_documents(TANG_SONG), tmp_path, vocab_size=1200)
    poems = list(iter_documents(TANG_SONG))
    assert len(poems) == 408
    for poem in poems:
        ids = tokenizer(poem, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == poem
    assert "作者：杜甫" in tokenizer.decode(tokenizer("作者：杜甫", add_special_tokens=False)["input_ids"])
    # merges learned on Chinese: fewer tokens than UTF-8 bytes (3 per character)
    assert tokens_per_char(tokenizer, poems) < 2.0
    # a tokenizer that never saw Chinese still round-trips it through its byte alphabet
    english, _ = small_tokenizer
    for poem in poems[:20] + ["naïve café — «ü» 😀\ttab\r\n"]:
        assert english.decode(english(poem, add_special_tokens=False)["input_ids"]) == poem


def test_training_is_deterministic(tmp_path, shakespeare_slice, small_tokenizer):
    _, first = small_tokenizer
    train_tokenizer(iter_documents(shakespeare_slice), tmp_path / "again", vocab_size=800)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    other = train_tokenizer(list(iter_documents(shakespeare_slice)), tmp_path / "bigger", vocab_size=900)
    assert tokenizer_digest(other) != tokenizer_digest(first)


def test_shipped_tokenizer():
    tokenizer = load_tokenizer("data/tokenizer")
    assert len(tokenizer) == 6400
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "ROMEO: But, soft! what light through yonder window breaks?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 2


def test_missing_or_unusable_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="python run.py tokenizer") as err:
        load_tokenizer(tmp_path / "nope")
    assert "nope" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        load_tokenizer(tmp_path / "empty")


def test_vocab_floor_and_texts_not_paths(tmp_path, shakespeare_slice):
    with pytest.raises(UserError, match="at least 259"):
        train_tokenizer(iter_documents(shakespeare_slice), tmp_path / "tiny", vocab_size=100)
    with pytest.raises(TypeError, match="train_tokenizer_on_corpus"):
        train_tokenizer(shakespeare_slice, tmp_path / "path", vocab_size=500)


def test_tokenizer_module_does_not_import_data():
    """data imports tokenizer (for its digest); the other way round would be a cycle."""
    tree = ast.parse((REPO_ROOT / "research" / "tokenizer.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {"research.config", "research.errors"} <= imported
    assert not imported & {"research.data", "research.corpus", "research.token_cache"}
