"""``mlmtool tokenizer``: byte-level BPE and WordPiece, saved so AutoTokenizer loads DIR."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlmtool.cli import app
from tests.conftest import make_model_dir, write_documents

SENTENCE = "Certainly, Mr. Darcy said the garden was very elegant in the morning!"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def assert_round_trip(d, mask: str, specials: list[str]):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(d))
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert hf.is_fast
    for text in (SENTENCE, "hello world", f"The {mask} was very {mask} indeed."):
        assert hf(text)["input_ids"] == raw.encode(text).ids
    # the mask token is one token, and specials are marked exactly
    enc = hf(f"The {mask} was elegant.", return_special_tokens_mask=True)
    ids, smask = enc["input_ids"], enc["special_tokens_mask"]
    assert ids.count(hf.mask_token_id) == 1
    assert smask == [1 if i in (hf.cls_token_id, hf.sep_token_id) else 0 for i in ids]
    assert smask[0] == smask[-1] == 1 and sum(smask) == 2
    assert hf.convert_ids_to_tokens(list(range(5))) == specials
    assert sorted(hf.all_special_ids) == [0, 1, 2, 3, 4]
    return hf


def test_bpe_end_to_end(tmp_path, corpus_file):
    d = make_model_dir(tmp_path / "m", "tiny")
    r = invoke("tokenizer", d, corpus_file, "--vocab-size", 400)
    assert r.exit_code == 0, r.output
    assert "Trained a byte-level BPE tokenizer" in r.output
    assert "300 documents" in r.output
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / name).is_file()
    assert not list(d.glob(".tokenizer.*"))  # the temp dir is gone

    hf = assert_round_trip(d, "<mask>", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token, hf.mask_token) == (
        "<s>", "</s>", "<pad>", "<unk>", "<mask>")
    assert hf.model_max_length == 512
    ids = hf(SENTENCE)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert hf.decode(ids, skip_special_tokens=True) == SENTENCE
    # <mask> takes the space before it (lstrip), as RoBERTa's
    assert hf("the <mask>")["input_ids"] == hf("the<mask>")["input_ids"]
    assert json.loads((d / "special_tokens_map.json").read_text())["mask_token"]["lstrip"] is True

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(d))
    assert cfg.vocab_size == len(hf) <= 400
    assert (cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id) == (0, 1, 2)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["tokenizer"]["args"]["type"] == "bpe"
    assert manifest["tokenizer"]["inputs"]["files"][0]["path"] == str(corpus_file.resolve())
    assert manifest["tokenizer"]["outputs"]["vocab_size"] == len(hf)


def test_wordpiece_end_to_end(tmp_path, corpus_file):
    d = make_model_dir(tmp_path / "m", "bert-tiny")
    r = invoke("tokenizer", d, corpus_file, "--vocab-size", 400, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["type"] == "wordpiece" and result["lowercase"] is True
    hf = assert_round_trip(d, "[MASK]", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert hf("Garden")["input_ids"] == hf("garden")["input_ids"]  # uncased by default
    tokens = hf.convert_ids_to_tokens(hf("gardens")["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert any(t.startswith("##") for t in hf.get_vocab())
    config = json.loads((d / "config.json").read_text())
    assert config["vocab_size"] == len(hf) == result["vocab_size"]
    assert config["pad_token_id"] == 0
    assert hf.model_max_length == 512


def test_lowercase_flags(tmp_path, corpus_file):
    from tokenizers import Tokenizer

    d = make_model_dir(tmp_path / "bpe", "tiny")
    assert invoke("tokenizer", d, corpus_file, "--vocab-size", 300, "--lowercase").exit_code == 0
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.encode("Garden WALK").ids == tok.encode("garden walk").ids

    w = make_model_dir(tmp_path / "wp", "bert-tiny")
    assert invoke("tokenizer", w, corpus_file, "--vocab-size", 400, "--no-lowercase").exit_code == 0
    tok = Tokenizer.from_file(str(w / "tokenizer.json"))
    assert tok.encode("Garden").ids != tok.encode("garden").ids


def test_type_overrides_model_convention(tmp_path, corpus_file):
    d = make_model_dir(tmp_path / "m", "tiny")  # roberta, but WordPiece asked for
    assert invoke("tokenizer", d, corpus_file, "--type", "wordpiece", "--vocab-size", 400).exit_code == 0
    config = json.loads((d / "config.json").read_text())
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 2, 3)
    r = invoke("tokenizer", d, corpus_file, "--type", "sentencepiece")
    assert "--type must be one of bpe, wordpiece, unigram, got 'sentencepiece'" in one_error_line(r)


def test_vocab_too_small(tmp_path, corpus_file):
    d = make_model_dir(tmp_path / "m", "tiny")
    line = one_error_line(invoke("tokenizer", d, corpus_file, "--vocab-size", 100))
    assert "vocab size 100 is too small" in line and "--vocab-size 261" in line
    w = make_model_dir(tmp_path / "w", "bert-tiny")
    line = one_error_line(invoke("tokenizer", w, corpus_file, "--vocab-size", 20))
    assert "too small for this corpus' alphabet" in line
    assert not (d / "tokenizer.json").exists() and not (w / "tokenizer.json").exists()


def test_needs_config(tmp_path, corpus_file):
    (tmp_path / "m").mkdir()
    line = one_error_line(invoke("tokenizer", tmp_path / "m", corpus_file))
    assert line == f"error: no config.json in {tmp_path / 'm'}: run 'mlmtool init {tmp_path / 'm'}' first"


def test_bad_config_is_refused_before_writing(tmp_path, corpus_file):
    d = make_model_dir(tmp_path / "m", "tiny")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))
    assert "not a multiple of num_attention_heads" in one_error_line(
        invoke("tokenizer", d, corpus_file, "--vocab-size", 300))
    (d / "config.json").write_text("{not json")
    assert "is not valid JSON" in one_error_line(invoke("tokenizer", d, corpus_file))
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]


def test_corpus_errors_leave_nothing(tmp_path):
    d = make_model_dir(tmp_path / "m", "tiny")
    config_before = (d / "config.json").read_text()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no documents" in one_error_line(invoke("tokenizer", d, empty))
    assert "no corpus given" in one_error_line(invoke("tokenizer", d))
    assert "does not exist" in one_error_line(invoke("tokenizer", d, tmp_path / "missing.txt"))
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]
    assert (d / "config.json").read_text() == config_before


def test_every_corpus_error_is_one_line_and_leaves_nothing(tmp_path):
    import gzip

    d = make_model_dir(tmp_path / "m", "tiny")
    (tmp_path / "a.docx").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("x")
    (tmp_path / "bin.txt").write_bytes(b"\0" * 64)
    with gzip.open(tmp_path / "blank.txt.gz", "wt") as f:
        f.write("\n \n\t\n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    cases = [
        ((), "no corpus given"),
        ((tmp_path / "missing.txt",), "does not exist"),
        ((str(tmp_path / "*.nothing"),), "no files match"),
        ((tmp_path / "a.docx",), "unsupported input file type"),
        ((tmp_path / "empty_dir",), "has no usable files"),
        ((tmp_path / "notes",), "has no usable files"),
        ((tmp_path / "bin.txt",), "looks binary"),
        ((tmp_path / "blank.txt.gz",), "no documents"),
        ((tmp_path / "latin1.txt",), "not valid UTF-8"),
        ((tmp_path / "a.jsonl",), "has no column 'text' (its columns: 'body')"),
        ((tmp_path / "a.jsonl", "--dataset", "oscar"), "both corpus files and --dataset"),
    ]
    for args, message in cases:
        line = one_error_line(invoke("tokenizer", d, *args, "--vocab-size", 300))
        assert message in line, (args, line)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]


def test_non_utf8_warning(tmp_path, corpus_file):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n" + corpus_file.read_bytes())
    d = make_model_dir(tmp_path / "m", "tiny")
    r = invoke("tokenizer", d, bad, "--vocab-size", 300)
    assert r.exit_code == 0, r.output
    assert f"warning: skipped 1 line that is not valid UTF-8: {bad} (1)" in r.output


def test_retrain_updates_config(tmp_path, corpus_file):
    d = make_model_dir(tmp_path / "m", "tiny")
    assert invoke("tokenizer", d, corpus_file, "--vocab-size", 300).exit_code == 0
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 300
    small = write_documents(tmp_path / "small.txt", ["ab ab ab ab", "ab ab"])
    assert invoke("tokenizer", d, small, "--vocab-size", 1000).exit_code == 0
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size()
    assert n < 300  # a tiny corpus gives few merges: config follows the real size
    assert json.loads((d / "config.json").read_text())["vocab_size"] == n


def test_sample_options_end_to_end(tmp_path, corpus_file):
    """--sample-bytes/--sample-documents: the trainer sees only the seeded sample, the display says it
    samples, and the manifest records the budget and the seed."""
    d = make_model_dir(tmp_path / "m", "tiny")
    r = invoke("tokenizer", d, corpus_file, "--vocab-size", 300, "--sample-bytes", 5000, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert "Sampling corpus" in r.output and "Sampled " in r.output and "on a sample of" in r.output, r.output
    record = json.loads((d / "manifest.json").read_text())["tokenizer"]
    assert record["args"]["sample_bytes"] == 5000 and record["args"]["seed"] == 3
    longest = max(len(line.encode()) for line in corpus_file.read_text().splitlines())
    assert 5000 <= record["outputs"]["sample"]["bytes"] < 5000 + longest  # the budget, give or take a document
    results = []
    for _ in range(2):
        r = invoke("tokenizer", d, corpus_file, "--vocab-size", 300, "--sample-documents", 2, "--json")
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.stdout))
    assert results[0]["tokenizer_sha256"] == results[1]["tokenizer_sha256"]  # seed 0 both times
    res = results[0]
    assert res["documents"] == 300 and res["sample"]["documents"] == 2 and res["sample"]["seed"] == 0
    assert res["vocab_size"] < 300  # two documents give few merges: the trainer saw only the sample
    line = one_error_line(invoke("tokenizer", d, corpus_file, "--sample-bytes", 9, "--sample-documents", 9))
    assert "--sample-bytes and --sample-documents both given" in line


def _rounded(tokenizer_json: dict) -> dict:
    """Unigram scores to 12 digits: the two writers print the last digit of a float64 differently."""
    vocab = tokenizer_json["model"].get("vocab")
    if isinstance(vocab, list):
        tokenizer_json["model"]["vocab"] = [[piece, round(score, 12)] for piece, score in vocab]
    return tokenizer_json


def test_files_match_what_transformers_saves(tmp_path):
    """tokenizer_files writes what PreTrainedTokenizerFast.save_pretrained writes (with our
    tokenizer_class), without importing transformers: a transformers upgrade that changes
    the format shows up here."""
    import pytest

    from mlmtool.models.base import ALGORITHM_SPECIALS as SPECIALS
    from mlmtool.data.tokenizer_train import add_post_processor, build_tokenizer, build_trainer, tokenizer_files

    transformers = pytest.importorskip("transformers")
    texts = [SENTENCE, "hello world", "déjà vu, naïve café"] * 40
    for kind in ("bpe", "wordpiece", "unigram"):
        tok = build_tokenizer(kind, lowercase=kind == "wordpiece")
        tok.train_from_iterator(texts, trainer=build_trainer(kind, vocab_size=400, min_frequency=1))
        add_post_processor(tok, kind)
        ours = tokenizer_files(tok, kind, model_max_length=512)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512,
                                                    **SPECIALS[kind].hf_kwargs())
        fast.save_pretrained(str(tmp_path / kind))
        theirs = {name: json.loads((tmp_path / kind / name).read_text(encoding="utf-8"))
                  for name in ("tokenizer.json", "tokenizer_config.json")}
        assert _rounded(json.loads(ours["tokenizer.json"])) == _rounded(theirs["tokenizer.json"])
        assert json.loads(ours["tokenizer_config.json"]) == {**theirs["tokenizer_config.json"],
                                                             "tokenizer_class": "PreTrainedTokenizerFast"}


@pytest.mark.slow
def test_training_does_not_import_transformers(tmp_path, corpus_file):
    """transformers costs 0.65 CPU-s to import, 10% of a 50k-vocabulary run (docs/benchmarks.md)."""
    from tests.pipeline import heavy_imports

    d = make_model_dir(tmp_path / "m", "tiny")
    assert heavy_imports("tokenizer", d, corpus_file, "--vocab-size", 400) == []
    assert (d / "tokenizer.json").is_file()
