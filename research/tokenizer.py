"""Byte-level BPE tokenizer: train one on texts, load it, fingerprint it.

Minimind-style: three special tokens with fixed ids 0, 1, 2 and a byte-level
alphabet, so every string (any script, any bytes) round-trips exactly. The saved
folder is an ordinary `transformers` tokenizer, loadable by AutoTokenizer.
Reading a corpus is not this module's business (data.train_tokenizer_on_corpus does it):

    python run.py tokenizer data.path=data/shakespeare.jsonl.gz out=data/tokenizer vocab_size=6400
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from research.config import resolve_path
from research.errors import UserError

PAD_TOKEN = "<|endoftext|>"  # id 0; also what padded rows are filled with
BOS_TOKEN = "<|im_start|>"  # id 1; starts every document
EOS_TOKEN = "<|im_end|>"  # id 2; ends every document
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # listed first, so their ids are 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

MODEL_MAX_LENGTH = 1_000_000_000  # no practical cap: sequence length is the data module's business
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
CREATE_HINT = "create one with `python run.py tokenizer data.path=CORPUS out=DIR [vocab_size=6400]`"


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 6400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it to `out_dir`.

    The same texts and vocab_size always give a byte-identical tokenizer.json.
    """
    if isinstance(texts, (str, Path)):
        raise TypeError("train_tokenizer takes texts, not a path; use research.data.train_tokenizer_on_corpus for a corpus")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    for token, expected_id in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID)):
        assert backend.token_to_id(token) == expected_id, f"{token} got id {backend.token_to_id(token)}"

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder` (relative paths as in config.resolve_path); never reaches a hub."""
    path = resolve_path(str(folder))
    if not path.is_dir():
        raise UserError(f"tokenizer folder not found: {path}; set data.tokenizer=FOLDER or {CREATE_HINT}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for unusable folders
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load a tokenizer from {path} ({reason}); point data.tokenizer at a saved tokenizer folder or {CREATE_HINT}") from None


def tokenizer_digest(tokenizer_or_folder: PreTrainedTokenizerBase | str | Path) -> str:
    """16 hex digits of sha256 over the tokenizer's tokenizer.json content and its special-token ids.

    A folder is loaded first, so a folder and the tokenizer loaded from it share one digest
    (the token cache is keyed on it).
    """
    tokenizer = tokenizer_or_folder
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # a slow (pure Python) tokenizer: its vocabulary is the best fingerprint there is
        serialized = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256((serialized + specials).encode("utf-8")).hexdigest()[:16]


def tokens_per_char(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], chunk: int = 256) -> float:
    """Average tokens per character: how much the tokenizer compresses this text."""
    n_tokens = n_chars = 0
    texts = iter(texts)
    while batch := list(itertools.islice(texts, chunk)):
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        n_tokens += sum(len(x) for x in ids)
        n_chars += sum(len(t) for t in batch)
    return n_tokens / max(n_chars, 1)


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """UTF-8 bytes of text each token id stands for (special tokens: 0), for bits per byte.

    A byte-level BPE token is written in GPT-2's byte alphabet, one character per byte, so its
    length is its byte count (a token may hold part of a multi-byte character). Other tokenizers:
    a byte-fallback token such as <0xE2> is one byte, any other is its decoded text's bytes.
    """
    special = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    lengths = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or token is None:
            lengths.append(0)
        elif byte_level:
            lengths.append(len(token))
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            lengths.append(1)
        else:
            lengths.append(len(tokenizer.convert_tokens_to_string([token]).encode("utf-8")))
    return lengths
