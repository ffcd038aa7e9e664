"""A multilingual model from scratch: XLM-R's family with a Unigram tokenizer on Korean text
(the seed notebook's language), through every command, loaded by transformers."""

from __future__ import annotations

import json
import random

import pytest

from tests.pipeline import invoke
from tests.test_predict import _same

pytestmark = pytest.mark.slow  # a training end to end

# Hangul syllables with no spaces inside words: where Unigram (SentencePiece) segments words
# that a whitespace pre-tokenizer would keep whole.
NOUNS = "학교 친구 선생님 어머니 아버지 사과 바다 하늘 도서관 시장 음식 영화 노래 기차 공원".split()
VERBS = "갔다 먹었다 보았다 읽었다 불렀다 만났다 좋아한다 기다렸다".split()
PARTICLES = "는 가 를 에서 와 의".split()


def korean_corpus(path, n_docs: int = 300, seed: int = 0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_docs):
        sentences = [f"{rng.choice(NOUNS)}{rng.choice(PARTICLES)} {rng.choice(NOUNS)}{rng.choice(PARTICLES)} "
                     f"{rng.choice(VERBS)}." for _ in range(rng.randint(2, 5))]
        lines.append(" ".join(sentences))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_xlm_roberta_unigram_on_korean_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    corpus = korean_corpus(tmp_path / "ko.txt")
    d = tmp_path / "xlmr"
    sets = []
    for s in ("hidden_size=32", "num_attention_heads=2", "intermediate_size=64", "num_hidden_layers=2",
              "max_position_embeddings=66"):
        sets += ["--set", s]
    r = invoke("init", d, "--preset", "xlm-roberta-tiny", *sets, "--json")
    assert r.exit_code == 0, r.output
    r = invoke("tokenizer", d, corpus, "--vocab-size", 300, "--json")  # the family's default: Unigram
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["type"] == "unigram"
    assert list(result["special_tokens"]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    config = json.loads((d / "config.json").read_text())
    assert (config["bos_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 1, 2)
    for args in (("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10),
                 ("train", d, "--max-steps", 8, "--per-device-train-batch-size", 4, "--learning-rate", 5e-3,
                  "--warmup-steps", 0, "--logging-steps", 4, "--save-steps", 8, "--eval-steps", 8),
                 ("eval", d, "--json")):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)

    tok = transformers.AutoTokenizer.from_pretrained(d)
    enc = tok("학교에서 친구를 만났다.")
    assert tok.unk_token_id not in enc["input_ids"]  # Hangul is in the vocabulary
    assert enc["input_ids"][0] == tok.cls_token_id == 0 and enc["input_ids"][-1] == tok.sep_token_id == 2
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(d, output_loading_info=True)
    assert type(model).__name__ == "XLMRobertaForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    texts = ["학교에서 친구를 <mask>.", "어머니와 <mask> 갔다."]
    r = invoke("predict", d, *texts, "--json", "-k", 3)
    assert r.exit_code == 0, r.output
    fill = transformers.pipeline("fill-mask", model=str(d), top_k=3, device="cpu")
    for got, text in zip(json.loads(r.stdout), texts):
        _same(got, fill(text))
