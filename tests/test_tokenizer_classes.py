"""The trained tokenizer of every model_type (the registry) behaves as the family's own
transformers class built from the same tokenizer.json: pairs (token types), pre-split words
(``is_split_into_words``, RoBERTa's ``add_prefix_space=True``), offsets, ``word_ids()``,
lower-casing; and tokenizer_config.json carries that class's fields."""

from __future__ import annotations

import json
import shutil

import pytest

from mlmtool import models
from mlmtool.data.corpus import open_corpus
from mlmtool.modeldir import ModelDir
from mlmtool.presets import build_config
from mlmtool.data.tokenizer_train import train_tokenizer
from tests.conftest import make_documents, make_model_dir, write_documents
from tests.test_tokenizer import _rounded

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PRESETS = {"roberta": "roberta-tiny", "bert": "bert-tiny", "xlm-roberta": "xlm-roberta-tiny",
           "camembert": None, "modernbert": "modernbert-tiny", "distilbert": "distilbert-tiny",
           "roberta-prelayernorm": "roberta-prelayernorm-tiny", "electra": "electra-tiny"}
#: model_types whose tokenizer loads as PreTrainedTokenizerFast (tokenizer.json as it is):
#: ALBERT's and BigBird's classes rebuild a SentencePiece pipeline of their own (quote and
#: accent normalizers) that a trained Unigram does not have, RoFormer's fast class needs jieba
GENERIC = {"albert": "albert-tiny", "big_bird": "big-bird-tiny", "roformer": "roformer-tiny"}
EXTRA = ["People of Paris said hello to the people.", "ﬁne Ｔｅｓｔ naïve Émile déjà vu!"] * 60
PAIR = ("The people said hello.", "Déjà vu in Paris, said the MOTHER.")
WORDS = ["The", "people", "of", "Paris", "said", "hello", "naïve"]
OFFSETS_TEXT = "Hello people of Paris, the people said."


def test_every_model_type_is_covered():
    assert set(PRESETS) | set(GENERIC) == set(models.supported_model_types())


@pytest.mark.parametrize("model_type", sorted(GENERIC))
def test_the_others_load_their_tokenizer_json_as_it_is(model_type, tmp_path):
    d = tmp_path / model_type
    make_model_dir(d, GENERIC[model_type])
    corpus = write_documents(tmp_path / "corpus.txt", make_documents(200) + EXTRA)
    train_tokenizer(d, open_corpus([str(corpus)]), vocab_size=1000, min_frequency=1, show_progress=False)
    from tokenizers import Tokenizer

    assert models.family_for(model_type).tokenizer[model_type].hf_class == "PreTrainedTokenizerFast"
    ours = _ours(d)
    assert type(ours).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert ours(PAIR[0], PAIR[1])["input_ids"] == raw.encode(PAIR[0], PAIR[1]).ids


def _config(d, model_type: str) -> None:
    if model_type != "camembert":  # no preset: from a config file, as 'init --from-config'
        make_model_dir(d, PRESETS[model_type])
        return
    cfg = d.parent / "camembert.json"
    cfg.write_text(json.dumps(models.family_for("camembert").tiny_test_configs()["camembert"]), encoding="utf-8")
    ModelDir(d, create=True).write_config(build_config(from_config=cfg))


def _train(tmp_path, model_type: str, **kw):
    d = tmp_path / model_type
    _config(d, model_type)
    corpus = write_documents(tmp_path / "corpus.txt", make_documents(200) + EXTRA)
    train_tokenizer(d, open_corpus([str(corpus)]), vocab_size=1000, min_frequency=1, show_progress=False, **kw)
    return d


@pytest.fixture(scope="module", params=sorted(PRESETS))
def trained(request, tmp_path_factory):
    model_type = request.param
    return model_type, _train(tmp_path_factory.mktemp("tok"), model_type)


def _theirs(d, tmp_path, model_type: str, **kw):
    """The family's class from DIR's tokenizer.json alone (its own defaults for the rest)."""
    family = models.family_for(model_type)
    defaults = family.tokenizer[model_type]
    bare = tmp_path / "bare"
    bare.mkdir(exist_ok=True)
    shutil.copyfile(d / "tokenizer.json", bare / "tokenizer.json")
    cls = getattr(transformers, defaults.hf_class)
    specials = defaults.specials_for(defaults.algorithm).hf_kwargs()
    if model_type == "camembert":  # else it adds camembert-base's <s>NOTUSED... to the vocabulary
        kw["extra_special_tokens"] = []
    return cls.from_pretrained(str(bare), **specials, model_max_length=128, **kw)


def _ours(d, **kw):
    return transformers.AutoTokenizer.from_pretrained(str(d), **kw)


@pytest.mark.slow
def test_loads_as_the_family_class_and_writes_its_fields(trained, tmp_path):
    model_type, d = trained
    defaults = models.family_for(model_type).tokenizer[model_type]
    ours, theirs = _ours(d), _theirs(d, tmp_path, model_type)
    assert type(ours) is type(theirs)
    assert list(ours.model_input_names) == list(defaults.model_input_names)
    theirs.save_pretrained(str(tmp_path / "saved"))
    written = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    if saved["tokenizer_class"] == "TokenizersBackend":  # v5's name of PreTrainedTokenizerFast (ModernBERT's)
        saved["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in set(saved) - {"is_local", "local_files_only", "model_max_length"}:
        assert written.get(key) == saved[key], key
    for key in ("tokenizer_class", "model_input_names", "clean_up_tokenization_spaces"):
        assert key in written
    # The class rebuilds the pipeline from the vocabulary: it must rebuild ours, normalizer included.
    rebuilt = json.loads((tmp_path / "saved" / "tokenizer.json").read_text(encoding="utf-8"))
    assert _rounded(rebuilt) == _rounded(json.loads((d / "tokenizer.json").read_text(encoding="utf-8")))


def _same(a, b):
    assert dict(a) == dict(b)
    assert a.word_ids() == b.word_ids()


@pytest.mark.slow
def test_pairs(trained, tmp_path):
    model_type, d = trained
    ours, theirs = _ours(d), _theirs(d, tmp_path, model_type)
    a, b = ours(*PAIR, return_offsets_mapping=True), theirs(*PAIR, return_offsets_mapping=True)
    _same(a, b)
    if model_type == "bert":  # sentence pairs carry their segment, as BertTokenizer's
        assert a["token_type_ids"][-1] == 1 and a["token_type_ids"][0] == 0
    batch = [ours(*PAIR, truncation=True, max_length=12, padding="max_length")]
    assert len(batch[0]["input_ids"]) == 12


@pytest.mark.slow
def test_pre_split_words(trained, tmp_path):
    model_type, d = trained
    defaults = models.family_for(model_type).tokenizer[model_type]
    kw = {"add_prefix_space": True} if defaults.algorithm == "bpe" else {}
    ours, theirs = _ours(d, **kw), _theirs(d, tmp_path, model_type, **kw)
    a = ours(WORDS, is_split_into_words=True, return_offsets_mapping=True)
    _same(a, theirs(WORDS, is_split_into_words=True, return_offsets_mapping=True))
    tokens = ours.convert_ids_to_tokens(a["input_ids"])
    word_ids = a.word_ids()
    assert sorted({w for w in word_ids if w is not None}) == list(range(len(WORDS)))
    # RoBERTa: each word starts as after a space ('Ġpeople', not 'p e ople'), as in training.
    # (ModernBERT's class, PreTrainedTokenizerFast, has no add_prefix_space in transformers 5:
    # pre-split words tokenize as at the start of a text, as answerdotai/ModernBERT-base's do.)
    if defaults.hf_class == "RobertaTokenizer":
        firsts = [t for i, (t, w) in enumerate(zip(tokens, word_ids)) if w is not None and word_ids[i - 1] != w]
        assert all(t.startswith("Ġ") for t in firsts), tokens
        assert "Ġpeople" in tokens


@pytest.mark.slow
def test_offsets_and_lower_casing(trained, tmp_path):
    model_type, d = trained
    ours, theirs = _ours(d), _theirs(d, tmp_path, model_type)
    a = ours(OFFSETS_TEXT, return_offsets_mapping=True)
    _same(a, theirs(OFFSETS_TEXT, return_offsets_mapping=True))
    spans = [OFFSETS_TEXT[s:e] for s, e in a["offset_mapping"] if e > s]
    assert not any(span.startswith(" ") for span in spans), spans  # entities start on the word
    lowered = models.family_for(model_type).tokenizer[model_type].lowercase
    text = "HELLO People ﬁne"
    _same(ours(text), theirs(text))
    pieces = "".join(ours.tokenize(text))
    assert ("HELLO" in pieces or "H" in pieces) is not lowered
    if model_type in ("xlm-roberta", "camembert"):  # NFKC kept: the ligature is two letters
        assert "ﬁ" not in pieces and "fi" in pieces.replace("▁", "")


def test_lowercased_roberta_keeps_its_normalizer(tmp_path):
    """RoBERTa's class has no lower-casing field: a --lowercase tokenizer is named
    PreTrainedTokenizerFast, which loads tokenizer.json as it is, with the family's fields."""
    d = _train(tmp_path, "roberta", lowercase=True)
    written = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert written["model_input_names"] == ["input_ids", "attention_mask"]
    assert _ours(d).tokenize("HELLO") == _ours(d).tokenize("hello")
