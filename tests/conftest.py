"""Shared fixtures."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from mlmtool.cli import quiet_orbax

# The suite compiles into no persistent cache (tests/test_compilation_cache.py turns it on
# in its own subprocesses); subprocesses the tests start inherit this.
os.environ["MLMTOOL_COMPILATION_CACHE"] = "0"

# What the command line does in its root callback, for the tests that call the library
# directly (checkpoint saves that fail on purpose): no orbax chatter in their output.
quiet_orbax()

# -- the generated corpora of every test --------------------------------------------------------

#: The corpus, tokenizer and prepare tests' words (test_corpus_*, test_tokenizer, test_prepare, test_piece_encoder).
CORPUS_WORDS = ("the a of and to in is was he she it they we you that this with for on at by "
                "from house garden letter morning evening walk dance ball sister brother mother "
                "father friend family marriage fortune estate visit conversation opinion "
                "character manner feeling happiness pleasure anxious agreeable handsome "
                "elegant amiable certainly perhaps never always quite very much little great "
                "kernel driver device memory interrupt buffer register module config").split()

#: The pipeline tests' words (tests/pipeline.py: init -> ... -> train -> predict "the king [MASK] good night").
WORDS = ("the king queen said good night to a man woman of this that and love war peace time day "
         "come go see hear speak my lord lady sir sweet fair true false heart mind eye hand death life "
         "house world heaven earth father mother son daughter friend enemy honour name word").split()

#: Words that trip tokenizers up: accents, scripts, odd whitespace, specials' text, control characters.
TRICKY_WORDS = ["Émile", "naïve", "日本語", "x" * 30, "  ", "\t", "\u00a0", "\u3000", "\u200b", "\x1c",
                "don't", "'s", "<mask>", "<s>", "</s>", "[MASK]", "ΟΔΟΣ", "a\u0301", "\u0301", "😀", "3.14",
                "--", "(x)", "straße", "\r", "\x00", "\ufffd", "İ"]


def make_documents(n_docs: int = 300, seed: int = 0, min_words: int = 3, max_words: int = 40, *,
                   words: tuple[str, ...] | list[str] = CORPUS_WORDS, phrases: int = 0) -> list[str]:
    """English-like documents (one line each) from ``words``, fixed seed: ``min_words`` to
    ``max_words`` random words and an ending; or, with ``phrases`` > 0, 2 to 8 sentences drawn
    from that many fixed phrases of 3 to 6 words (structure a few training steps learn)."""
    rng = random.Random(seed)
    if phrases:
        pool = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) for _ in range(phrases)]
        return [". ".join(rng.choice(pool).capitalize() for _ in range(rng.randint(2, 8))) + "."
                for _ in range(n_docs)]
    docs = []
    for _ in range(n_docs):
        doc = [rng.choice(words) for _ in range(rng.randint(min_words, max_words))]
        doc[0] = doc[0].capitalize()
        docs.append(" ".join(doc) + rng.choice([".", "!", "?", ", Mr. Darcy said."]))
    return docs


def write_documents(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return path


def read_all(corpus, **kw) -> list[str]:
    """Every document of one pass over ``corpus`` (an mlmtool.data.corpus.Corpus)."""
    return [d for b in corpus.batches(**kw) for d in b.documents]


def make_model_dir(path: Path, preset: str = "tiny", *overrides: str) -> Path:
    """A model directory with config.json (as 'mlmtool init' writes it, without the CLI)."""
    from mlmtool.modeldir import ModelDir
    from mlmtool.presets import build_config

    ModelDir(path, create=True).write_config(build_config(preset, overrides=list(overrides)))
    return path


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return make_documents(300, seed=0)


@pytest.fixture
def corpus_file(tmp_path, corpus_docs) -> Path:
    return write_documents(tmp_path / "corpus.txt", corpus_docs)


def _trained(tmp_path_factory, preset: str, vocab_size: int) -> Path:
    from mlmtool.data.corpus import open_corpus
    from mlmtool.data.tokenizer_train import train_tokenizer

    root = tmp_path_factory.mktemp(f"trained-{preset}")
    corpus = write_documents(root / "corpus.txt", make_documents(300, seed=0))
    d = make_model_dir(root / "model", preset)
    train_tokenizer(d, open_corpus([corpus]), vocab_size=vocab_size, show_progress=False)
    return d


@pytest.fixture(scope="session")
def _bpe_dir(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "tiny", 400)


@pytest.fixture(scope="session")
def _wordpiece_dir(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "bert-tiny", 400)


@pytest.fixture
def bpe_dir(tmp_path, _bpe_dir) -> Path:
    """A fresh copy of a roberta 'tiny' model directory with a trained byte-level BPE (vocab 400)."""
    return Path(shutil.copytree(_bpe_dir, tmp_path / "bpe-model"))


@pytest.fixture
def wordpiece_dir(tmp_path, _wordpiece_dir) -> Path:
    """A fresh copy of a 'bert-tiny' model directory with a trained WordPiece (vocab 400)."""
    return Path(shutil.copytree(_wordpiece_dir, tmp_path / "wp-model"))
