"""Minimal pairs: PLL against transformers one mask at a time, ties, bad input, the set builder,
train --eval-minimal-pairs and a trained model beating a random one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlmtool.minimal_pairs import Pair, accuracy, masked_rows, read_pairs, word_ids
from tests.pipeline import invoke, trained_dir

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["The king said good night to the queen.", "Sweet lady, my heart is true and fair."]


def write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path


def reference_pll(mdir: Path, sentence: str, word_l2r: bool) -> float:
    """PLL with transformers on the export, one masked copy at a time; words from the
    byte-level pieces (a piece starting with 'Ġ', or the first after a special token, starts one)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mdir))
    model = AutoModelForMaskedLM.from_pretrained(str(mdir)).eval()
    ids = tok(sentence)["input_ids"]
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(ids)
    word, words = -1, []
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        if tid in special:
            words.append(None)
            continue
        if piece.startswith("Ġ") or ids[i - 1] in special:
            word += 1
        words.append(word)
    total = 0.0
    for t, tid in enumerate(ids):
        if tid in special:
            continue
        row = list(ids)
        row[t] = tok.mask_token_id
        u = t + 1
        while word_l2r and u < len(ids) and words[u] == words[t]:
            row[u] = tok.mask_token_id
            u += 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row])).logits[0, t]
        total += float(torch.log_softmax(logits.double(), -1)[tid])
    return total


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return trained_dir(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("pll", ["token", "word-l2r"])
def test_pll_equals_transformers_one_mask_at_a_time(trained, pll):
    from mlmtool.minimal_pairs import pll_scorer
    from mlmtool.modeldir import ModelDir
    from mlmtool.models import load_model

    mdir = ModelDir(trained)
    loaded = load_model(mdir.read_config())
    scorer = pll_scorer(mdir, loaded, loaded.load_hf(mdir.weights_path), pll=pll, batch_rows=8)  # several batches
    got = scorer.score(SENTENCES)
    want = [reference_pll(trained, s, pll == "word-l2r") for s in SENTENCES]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_word_l2r_masks_the_rest_of_the_word_only():
    from mlmtool.tokenizer_facts import ENDS_WORD, STARTS_WORD

    table = np.array([STARTS_WORD | ENDS_WORD, STARTS_WORD, 0, 0, STARTS_WORD], dtype=np.uint8)  # 0 special
    ids, special = [0, 1, 2, 3, 4, 2, 0], [True, False, False, False, False, False, True]
    words = word_ids(ids, special, table)
    assert words == [-1, 0, 0, 0, 1, 1, -1]
    rows = masked_rows(ids, special, words, mask_token_id=9)
    assert [t for _, t in rows] == [1, 2, 3, 4, 5]
    assert rows[0][0] == [0, 9, 9, 9, 4, 2, 0]  # its word's pieces to the right
    assert rows[1][0] == [0, 1, 9, 9, 4, 2, 0]  # not the one to the left
    assert rows[3][0] == [0, 1, 2, 3, 9, 9, 0]
    assert masked_rows(ids, special, None, 9)[0][0] == [0, 9, 2, 3, 4, 2, 0]  # token PLL: one mask


class Constant:
    def score(self, sentences):
        return np.zeros(len(sentences))


class ByLength:
    def score(self, sentences):
        return -np.array([len(s) for s in sentences], dtype=float)


def test_ties_count_as_wrong():
    pairs = [Pair("a b", "a b c", "x"), Pair("a b c", "a b", "x"), Pair("a", "b", "y")]
    assert accuracy(pairs, Constant())["minimal_pairs_accuracy"] == 0.0
    out = accuracy(pairs, ByLength())  # shorter wins: right, wrong, tie (wrong)
    assert out["minimal_pairs_accuracy"] == pytest.approx(1 / 3)
    assert out["minimal_pairs_ties"] == 1
    assert out["minimal_pairs"] == {"x": {"accuracy": 0.5, "pairs": 2}, "y": {"accuracy": 0.0, "pairs": 1}}


def test_set_names_uid_else_file_name(tmp_path):
    f = write_pairs(tmp_path / "mine.jsonl", [{"sentence_good": "a", "sentence_bad": "b", "UID": "agr"},
                                              {"sentence_good": "a", "sentence_bad": "b"}])
    assert [p.set_name for p in read_pairs([f])] == ["agr", "mine"]


@pytest.mark.slow
def test_eval_minimal_pairs_writes_results_metrics_and_tensorboard(trained, tmp_path):
    from tests.tb_events import read_scalars

    d = Path(shutil.copytree(trained, tmp_path / "model"))
    shutil.rmtree(d / "tensorboard", ignore_errors=True)
    f = write_pairs(tmp_path / "p.jsonl", [{"sentence_good": SENTENCES[0], "sentence_bad": SENTENCES[1], "UID": "s"},
                                           {"sentence_good": SENTENCES[1], "sentence_bad": SENTENCES[0]}])
    r = invoke("eval", d, "--minimal-pairs", f, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    # one sentence beats the other: exactly one of the two mirrored pairs is right
    assert out["minimal_pairs_accuracy"] == 0.5 and set(out["minimal_pairs"]) == {"s", "p"}
    assert json.loads((d / "eval_results.json").read_text())["minimal_pairs"] == out["minimal_pairs"]
    record = json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["minimal_pairs_accuracy"] == 0.5 and record["step"] == 20
    tags = read_scalars(d / "tensorboard")
    assert tags["eval/minimal_pairs_accuracy"] == [(20, 0.5)]
    assert {"minimal_pairs/s", "minimal_pairs/p"} <= set(tags)


BAD = [
    ("missing", None, "cannot read"),
    ("bad-json", '{"sentence_good": "a", "sentence_bad": "b"}\n{not json\n', "p.jsonl:2 is not JSON"),
    ("missing-key", '{"sentence_good": "a"}\n', "has no sentence_bad"),
    ("not-object", '["a", "b"]\n', "is not a JSON object"),
    ("empty", "\n", "holds no pair"),
    ("too-long", json.dumps({"sentence_good": "the king " * 80, "sentence_bad": "a b"}) + "\n",
     "max_position_embeddings"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,text,problem", BAD, ids=[c[0] for c in BAD])
def test_bad_minimal_pair_files_one_line_exit_1(trained, tmp_path, case, text, problem):
    f = tmp_path / "p.jsonl"
    if text is not None:
        f.write_text(text, encoding="utf-8")
    before = (trained / "eval_results.json").read_bytes() if (trained / "eval_results.json").exists() else None
    r = invoke("eval", trained, "--minimal-pairs", f)
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and problem in lines[0], r.output
    after = (trained / "eval_results.json").read_bytes() if (trained / "eval_results.json").exists() else None
    assert before == after


@pytest.mark.slow
def test_bad_pll_mode(trained, tmp_path):
    f = write_pairs(tmp_path / "p.jsonl", [{"sentence_good": "a", "sentence_bad": "b"}])
    r = invoke("eval", trained, "--minimal-pairs", f, "--pll", "sentence")
    assert r.exit_code == 1 and "--pll must be one of" in r.output


# -- scripts/make_minimal_pairs.py ----------------------------------------------------------------

CORPUS = """It was a fine day and he was happy to see an old friend. They were at the door.
She has a horse and they have this small house near the river. These books are new, said Mr. Knightley to them.
We are sure that it is an honour to dine with an earl. I have seen a cat in the garden today.
"""


def make(tmp_path: Path, name: str, *args) -> tuple[int, str, str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minimal_pairs.py"), str(corpus), "-o",
                          str(tmp_path / name), *map(str, args)], capture_output=True, text=True)
    return out.returncode, out.stderr, (tmp_path / name).read_text() if (tmp_path / name).exists() else ""


def test_make_minimal_pairs_is_deterministic_and_documented(tmp_path):
    rc1, err, first = make(tmp_path, "a.jsonl")
    rc2, _, second = make(tmp_path, "b.jsonl")
    assert rc1 == rc2 == 0, err
    assert first == second  # byte for byte
    pairs = [json.loads(line) for line in first.splitlines()]
    by_set = {}
    for p in pairs:
        by_set.setdefault(p["UID"], []).append(p)
        assert p["sentence_good"] != p["sentence_bad"]
        assert p["sentence_good"] in CORPUS  # a real sentence, unchanged
    assert set(by_set) == {"agreement_is_are", "agreement_was_were", "agreement_has_have", "determiner_this_these",
                           "determiner_a_an", "swap_adjacent"}
    assert by_set["agreement_was_were"][0]["sentence_bad"] == \
        "It were a fine day and he was happy to see an old friend."
    assert by_set["agreement_is_are"][0]["sentence_bad"] == "We is sure that it is an honour to dine with an earl."
    assert by_set["agreement_has_have"][0]["sentence_bad"] == "She have a horse and they have this small house near " \
                                                              "the river."
    assert by_set["determiner_this_these"][0]["sentence_bad"] == "She has a horse and they have these small house " \
                                                                 "near the river."
    assert by_set["determiner_a_an"][0]["sentence_bad"] == "It was an fine day and he was happy to see an old friend."
    assert any(p["sentence_good"] == "These books are new, said Mr. Knightley to them." for p in pairs)  # Mr. kept
    assert read_pairs([tmp_path / "a.jsonl"])  # the format eval reads
    rc, _, one = make(tmp_path, "c.jsonl", "--per-set", 1)
    assert rc == 0 and len(one.splitlines()) == 6


@pytest.mark.slow
def test_make_minimal_pairs_bad_input(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minimal_pairs.py"), str(tmp_path / "none.txt"),
                          "-o", str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "is not a file" in out.stderr


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_eval_minimal_pairs_scores_at_every_evaluation(trained, tmp_path):
    d = Path(shutil.copytree(trained, tmp_path / "model"))
    f = write_pairs(tmp_path / "p.jsonl", [{"sentence_good": SENTENCES[0], "sentence_bad": SENTENCES[1]}])
    r = invoke("train", d, "--max-steps", 4, "--per-device-train-batch-size", 8, "--eval-steps", 2,
               "--eval-minimal-pairs", f, "--no-resume", "--force")
    assert r.exit_code == 0, r.output
    assert "minimal pairs" in r.output
    evals = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    scored = [e["step"] for e in evals if "minimal_pairs_accuracy" in e]
    assert scored[-2:] == [2, 4]
    r = invoke("train", d, "--max-steps", 4, "--eval-minimal-pairs", tmp_path / "none.jsonl", "--no-resume",
               "--force")
    assert r.exit_code == 1 and "cannot read the minimal-pair file" in r.output


# -- scripts/bench_quality.py (the probe's task; the fine-tuning itself is a benchmark) -------------


def test_probe_task_is_balanced_held_out_and_deterministic():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_quality

    if not (bench_quality.CORPORA / "en_austen.txt.xz").exists():
        pytest.skip("../shared/corpora is not here")
    train, test, labels = bench_quality.make_task("order", 20)
    assert labels == 2 and len(train) == len(test) == 80
    assert bench_quality.make_task("order", 20)[0] == train
    assert 0.3 < np.mean([y for _, y in train]) < 0.7  # about half swapped
    assert not {t for t, _ in train} & {t for t, _ in test}  # different documents
    src_train, _, n = bench_quality.make_task("source", 20)
    assert n == 4 and sorted({y for _, y in src_train}) == [0, 1, 2, 3]


@pytest.mark.slow
def test_bench_quality_refuses_a_directory_without_export(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "holds no export" in out.stderr
