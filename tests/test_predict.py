"""mlmtool predict: fill-mask output agrees with transformers' fill-mask pipeline on DIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pipeline import invoke, trained_dir, write_corpus

pytestmark = pytest.mark.slow  # a trained directory against the fill-mask pipeline

TEXTS = ["The king <mask> good night.", "Come <mask> my lord, sweet lady.", "<mask> love war peace",
         "the <mask> said to the <mask> of this house"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return trained_dir(tmp_path_factory)


def _same(ours, theirs) -> None:
    """Our predictions == the pipeline's: same tokens in the same order (up to exact ties),
    scores within 1e-4, same token_str and sequence."""
    assert isinstance(ours, list) and len(ours) == len(theirs)
    if theirs and isinstance(theirs[0], list):  # several masks: one list per mask
        for a, b in zip(ours, theirs):
            _same(a, b)
        return
    assert all(set(p) == {"score", "token", "token_str", "sequence"} for p in ours)
    for a, b in zip(ours, theirs):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        if a["token"] == b["token"]:
            assert (a["token_str"], a["sequence"]) == (b["token_str"], b["sequence"])
        else:  # two tokens with (float-)equal probability may come out in either order
            assert abs(a["score"] - b["score"]) < 1e-6, (a, b)
    assert sum(a["token"] == b["token"] for a, b in zip(ours, theirs)) >= len(ours) - 1


def _pipeline(d: Path, top_k: int):
    from transformers import pipeline

    return pipeline("fill-mask", model=str(d), top_k=top_k, device="cpu")


def test_predict_json_matches_hf_pipeline(trained):
    r = invoke("predict", trained, *TEXTS, "--json", "--top-k", 4)
    assert r.exit_code == 0, r.output
    ours = json.loads(r.stdout)
    assert len(ours) == len(TEXTS)
    fill = _pipeline(trained, 4)
    for text, got in zip(TEXTS, ours):
        want = fill(text)
        _same(got, want)
    # One text: the pipeline's own shape for one input (a list of predictions, not wrapped).
    r = invoke("predict", trained, TEXTS[0], "--json", "--top-k", 4, "--checkpoint", "export")
    assert r.exit_code == 0, r.output
    single = json.loads(r.stdout)
    assert isinstance(single, list) and isinstance(single[0], dict) and len(single) == 4
    _same(single, fill(TEXTS[0]))
    # Two masks: one list per mask, sequences keep the special tokens (as the pipeline does).
    assert isinstance(ours[3], list) and len(ours[3]) == 2 and ours[3][0][0]["sequence"].startswith("<s>")


def test_predict_stdin_top_k_and_table(trained, monkeypatch):
    monkeypatch.setenv("MLMTOOL_QUIET", "0")  # --quiet sets it to 1 for the process; restored afterwards
    by_args = json.loads(invoke("predict", trained, *TEXTS[:2], "--json", "-k", 2).stdout)
    r = invoke("--quiet", "predict", trained, *TEXTS[:2], "--json", "-k", 2)
    assert r.exit_code == 0 and json.loads(r.stdout) == by_args
    for args in ((), ("-",)):
        r = invoke("predict", trained, *args, "--json", "-k", 2, input="\n".join(TEXTS[:2]) + "\n\n")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == by_args
    assert all(len(preds) == 2 for preds in by_args)
    r = invoke("predict", trained, TEXTS[0], "--top-k", 3)
    assert r.exit_code == 0, r.output
    assert "score" in r.stdout and "sequence" in r.stdout
    single = json.loads(invoke("predict", trained, TEXTS[0], "--json", "-k", 3).stdout)
    assert all(f"{p['score']:.4f}" in r.stdout for p in single)


@pytest.mark.parametrize("args, message", [
    (("The king said good night.",), "no <mask>"),
    (("The king <mask>.", "--top-k", "0"), "--top-k must be at least 1"),
    (("The king <mask>.", "--checkpoint", "7"), "no checkpoint at step 7"),
])
def test_predict_errors(trained, args, message):
    r = invoke("predict", trained, *args)
    assert r.exit_code == 1
    assert message in r.stderr and "Traceback" not in r.output


def test_predict_no_text_and_untrained(tmp_path, trained):
    r = invoke("predict", trained, input="")
    assert r.exit_code == 1 and "no text given" in r.stderr
    import shutil

    d = Path(shutil.copytree(trained, tmp_path / "m", ignore=shutil.ignore_patterns(
        "checkpoints", "model.safetensors")))
    r = invoke("predict", d, "The <mask>.")
    assert r.exit_code == 1 and "no trained model" in r.stderr


def test_predict_bert_wordpiece_matches_hf_pipeline(tmp_path):
    """BERT / WordPiece / [MASK], on an export written without training (a wide initialisation
    makes the predictions far from uniform, so the order of the top k is well defined)."""
    import jax

    from mlmtool.modeldir import ModelDir
    from mlmtool.models import load_model

    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=200)
    d = tmp_path / "bert"
    sets = []
    for s in ("hidden_size=32", "num_attention_heads=2", "intermediate_size=64", "num_hidden_layers=2",
              "max_position_embeddings=64", "initializer_range=0.5"):
        sets += ["--set", s]
    assert invoke("init", d, "--preset", "bert-tiny", *sets).exit_code == 0
    r = invoke("tokenizer", d, corpus, "--vocab-size", 200)
    assert r.exit_code == 0, r.output
    loaded = load_model(ModelDir(d).read_config())
    loaded.save_hf(jax.device_get(loaded.init(3)), d / "model.safetensors")
    texts = ["the king [MASK] good night.", "[MASK] my lord", "the [MASK] said to the [MASK] of this"]
    r = invoke("predict", d, *texts, "--json", "-k", 5)
    assert r.exit_code == 0, r.output
    fill = _pipeline(d, 5)
    for text, got in zip(texts, json.loads(r.stdout)):
        _same(got, fill(text))
