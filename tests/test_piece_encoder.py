"""The piece cache (mlmtool.data.piece_encoder): exactly encode_batch's ids, on random text, for
every tokenizer kind mlmtool trains; and it refuses the pipelines it cannot be exact for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlmtool.data.corpus import open_corpus
from tests.conftest import CORPUS_WORDS, TRICKY_WORDS, make_model_dir, write_documents

_words = st.sampled_from(CORPUS_WORDS + TRICKY_WORDS)


def _lowercase_bpe(tmp_path_factory, corpus_docs) -> Path:
    from mlmtool.data.tokenizer_train import train_tokenizer

    d = make_model_dir(tmp_path_factory.mktemp("lc") / "m", "tiny")
    corpus = write_documents(d.parent / "c.txt", corpus_docs)
    train_tokenizer(d, open_corpus([corpus]), vocab_size=350, lowercase=True, show_progress=False)
    return d


@pytest.fixture(scope="module")
def tokenizer_paths(_bpe_dir, _wordpiece_dir, tmp_path_factory, corpus_docs) -> list[str]:
    return [str(_bpe_dir / "tokenizer.json"), str(_wordpiece_dir / "tokenizer.json"),
            str(_lowercase_bpe(tmp_path_factory, corpus_docs) / "tokenizer.json")]


_text = st.lists(st.one_of(_words, st.sampled_from([" ", " ", " ", "  ", "\t", "\n"]),
                           st.text(max_size=3)), max_size=40).map("".join)


@settings(max_examples=100, deadline=None)
@given(docs=st.lists(_text, min_size=1, max_size=12))
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_piece_encoder_equals_encode_batch(tokenizer_paths, docs):
    from tokenizers import Tokenizer

    from mlmtool.data.piece_encoder import PieceEncoder

    for path in tokenizer_paths:
        tok = Tokenizer.from_file(path)
        assert PieceEncoder.supports(json.loads(Path(path).read_text()))
        want = [e.ids for e in tok.encode_batch(docs)]
        for enc in (PieceEncoder(tok), PieceEncoder(tok, max_entries=4)):  # (tiny: resets often)
            assert enc.enabled
            for _ in range(2):  # cold and warm cache
                assert enc.encode_lists(docs) == want
                flat, lengths = enc.encode_stream(docs, np.dtype("<u2"))
                assert flat.tolist() == [t for ids in want for t in ids]
                assert lengths.tolist() == [len(ids) for ids in want]
            assert enc.encode_lists([]) == [] and enc.encode_stream([], np.dtype("<u2"))[0].size == 0


def test_piece_encoder_refuses_other_pipelines(_bpe_dir):
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers

    from mlmtool.data.piece_encoder import PieceEncoder

    spec = json.loads((_bpe_dir / "tokenizer.json").read_text())
    assert PieceEncoder.supports(spec)
    tok = Tokenizer.from_file(str(_bpe_dir / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not PieceEncoder.supports(json.loads(tok.to_str()))
    tok = Tokenizer.from_file(str(_bpe_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken("New York")])
    assert not PieceEncoder.supports(json.loads(tok.to_str()))
    tok = Tokenizer.from_file(str(_bpe_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<sep2>", rstrip=True)])
    assert not PieceEncoder.supports(json.loads(tok.to_str()))
    docs = ["Visit New York <sep2> now", "the garden"]
    enc = PieceEncoder(tok)
    enc.enabled = False  # what prepare does for such a tokenizer: plain encode_batch
    assert enc.encode_lists(docs) == [e.ids for e in tok.encode_batch(docs)]
