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
from tests.pipeline import invoke, prepared_dir, trained_dir

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
    from mlmtool.data.tokenizer_facts import ENDS_WORD, STARTS_WORD

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
    assert r.exit_code == 1 and "--pll must be word-l2r or token, got 'sentence'" in r.output


# -- scripts/make_minimal_pairs.py ----------------------------------------------------------------

CORPUS = """It was a fine day and he was happy to see an old friend. They were at the door.
She has a horse and they have this small house near the river. These books are new, said Mr. Knightley to them.
We are sure that it is an honour to dine with an earl. I have seen a cat in the garden today.
He is an old man and she is kind to him.
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
    rc, _, two = make(tmp_path, "c.jsonl", "--per-set", 2)
    assert rc == 0 and len(two.splitlines()) == 12  # one pair of each direction; two swaps
    rc, err, _ = make(tmp_path, "d.jsonl", "--per-set", 1)  # cannot balance a set of one
    assert rc == 2 and "at least 2" in err


def test_made_sets_are_balanced_so_word_frequency_scores_half(tmp_path):
    """Each agreement/determiner set holds as many pairs of one direction (is->are) as of the
    other (are->is): a scorer that only prefers the corpus's more frequent word scores 0.5."""
    import collections
    import lzma

    corpus = Path("/work/shared/corpora/en_austen.txt.xz")
    corpus = corpus if corpus.exists() else ROOT.parent / "shared" / "corpora" / "en_austen.txt.xz"
    if not corpus.exists():
        pytest.skip("../shared/corpora is not here")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minimal_pairs.py"), str(corpus), "-o",
                          str(tmp_path / "p.jsonl"), "--per-set", "60"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    raw = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    with lzma.open(corpus, "rt", encoding="utf-8") as f:
        freq = collections.Counter(w.lower() for w in f.read().split())
    for name in ("agreement_is_are", "agreement_was_were", "agreement_has_have", "determiner_this_these",
                 "determiner_a_an"):
        pairs = [p for p in raw if p["UID"] == name]
        directions = collections.Counter(p["change"] for p in pairs)
        assert len(directions) == 2 and len(set(directions.values())) == 1, (name, directions)
        assert len(pairs) == 60, (name, directions)  # Austen has 30 of each in her first documents
        good, bad = zip(*(p["change"].split("->") for p in pairs))
        assert np.mean([freq[g] > freq[b] for g, b in zip(good, bad)]) == 0.5, name  # frequency alone: chance
        assert [p["pair_id"] for p in pairs] == list(range(60))
    assert sum(p["UID"] == "swap_adjacent" for p in raw) == 60


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


# -- ELECTRA: the discriminator's score ---------------------------------------------------------------


@pytest.fixture(scope="module")
def electra(tmp_path_factory) -> Path:
    """electra-tiny (the pair) on the test corpus, a few steps: DIR is ElectraForPreTraining."""
    d = prepared_dir(tmp_path_factory.mktemp("electra"), preset="electra-tiny")
    r = invoke("train", d, "--max-steps", 6, "--per-device-train-batch-size", 8, "--learning-rate", 5e-3,
               "--warmup-steps", 1, "--logging-steps", 3, "--save-steps", 6)
    assert r.exit_code == 0, r.output
    return d


def reference_discriminator(mdir: Path, sentence: str) -> float:
    """sum over non-special tokens of log sigmoid(-logit), transformers' ElectraForPreTraining on the export."""
    import torch
    from transformers import AutoTokenizer, ElectraForPreTraining

    tok = AutoTokenizer.from_pretrained(str(mdir))
    model = ElectraForPreTraining.from_pretrained(str(mdir)).eval()
    enc = tok(sentence, return_special_tokens_mask=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].double()
    keep = torch.tensor(enc["special_tokens_mask"]) == 0
    return float(torch.nn.functional.logsigmoid(-logits)[keep].sum())


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_electra_discriminator_score_equals_transformers(electra):
    from mlmtool.minimal_pairs import DiscriminatorScorer, scorer_for
    from mlmtool.modeldir import ModelDir
    from mlmtool.models import load_model

    mdir = ModelDir(electra)
    loaded = load_model(mdir.read_config())
    scorer = scorer_for(mdir, loaded, loaded.load_hf(mdir.weights_path), pll="token", batch_rows=2)  # 2 batches
    assert isinstance(scorer, DiscriminatorScorer)  # not PLL: the discriminator has no MLM head
    sentences = [*SENTENCES, "Good night, sweet lord.", "The man of war said the queen is fair."]
    got = scorer.score(sentences)
    want = [reference_discriminator(electra, s) for s in sentences]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert len(set(np.round(got, 3))) == len(got) and (got < 0).all()  # a real score, not a constant


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_eval_minimal_pairs_on_electra_scores_the_discriminator(electra, tmp_path):
    d = Path(shutil.copytree(electra, tmp_path / "model"))
    f = write_pairs(tmp_path / "p.jsonl", [{"sentence_good": SENTENCES[0], "sentence_bad": SENTENCES[1]},
                                           {"sentence_good": SENTENCES[1], "sentence_bad": SENTENCES[0]}])
    r = invoke("eval", d, "--minimal-pairs", f, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["scorer"] == "discriminator" and "pll" not in out
    assert out["minimal_pairs_accuracy"] == 0.5 and out["minimal_pairs_ties"] == 0  # mirrored pairs: one right
    r = invoke("eval", d, "--minimal-pairs", f)
    assert r.exit_code == 0 and "discriminator" in r.output.splitlines()[0], r.output
    too_long = write_pairs(tmp_path / "long.jsonl", [{"sentence_good": "the king " * 80, "sentence_bad": "a b"}])
    r = invoke("eval", d, "--minimal-pairs", too_long)
    assert r.exit_code == 1 and r.output.startswith("error:") and "max_position_embeddings" in r.output


# -- a trained model beats a random one on a made set -------------------------------------------------

NOUNS = [("house", "houses"), ("garden", "gardens"), ("letter", "letters"), ("horse", "horses"),
         ("friend", "friends"), ("book", "books"), ("room", "rooms"), ("sister", "sisters"),
         ("carriage", "carriages"), ("field", "fields")]
CONSONANT_ADJ = ["quiet", "small", "good", "fine", "young", "new", "pretty", "long"]
VOWEL_ADJ = ["old", "empty", "idle", "odd", "elegant", "amiable", "early", "ample"]
PRONOUNS = {"sg": (["he", "she", "it"], ["is", "was", "has"]), "pl": (["we", "they", "you"], ["are", "were", "have"])}


def grammar_documents(n: int, seed: int = 0) -> list[str]:
    """Documents of sentences that keep the agreements make_minimal_pairs.py breaks: a pronoun
    and its verb, this/these and the noun's number, a/an and the next word's first letter."""
    import random

    rng = random.Random(seed)

    def noun_phrase():
        sg, pl = rng.choice(NOUNS)
        return rng.choice([f"a {rng.choice(CONSONANT_ADJ)} {sg}", f"an {rng.choice(VOWEL_ADJ)} {sg}",
                           f"this {sg}", f"these {pl}"])

    def sentence():
        subjects, verbs = PRONOUNS[rng.choice(("sg", "pl"))]
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {noun_phrase()} {rng.choice(['in', 'near', 'with', 'for'])} " \
            f"{noun_phrase()}"
        return s[0].upper() + s[1:] + "."

    return [" ".join(sentence() for _ in range(rng.randint(3, 6))) for _ in range(n)]


@pytest.mark.slow
def test_trained_model_beats_random_on_made_pairs(tmp_path):
    """Pre-training (2,000 small steps, seconds of compute) must lift the minimal-pair accuracy on
    pairs made from held-out documents above the same network's random initialisation: measured
    0.606 against 0.514 (360 pairs: 0.06 is 2.3 standard errors; random inits score 0.43-0.53),
    before the sets were balanced by direction; it still passes balanced (the grammar uses both
    directions about equally: 30 of each per set here).
    It fails when training teaches nothing: a variant (another draw of the same grammar,
    hidden_size=64 at this learning rate) stayed at the unigram loss and scored 0.49 against 0.48."""
    import jax

    from mlmtool.minimal_pairs import scorer_for
    from mlmtool.modeldir import ModelDir
    from mlmtool.models import load_model

    docs = grammar_documents(1200)
    train_text, all_text = tmp_path / "train.txt", tmp_path / "all.txt"
    train_text.write_text("\n".join(docs[:1000]) + "\n", encoding="utf-8")
    all_text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    d = tmp_path / "model"
    sets = [a for s in ("hidden_size=32", "num_attention_heads=2", "intermediate_size=64", "num_hidden_layers=2",
                        "max_position_embeddings=66") for a in ("--set", s)]
    for args in (("init", d, "--preset", "tiny", *sets),
                 ("tokenizer", d, train_text, "--vocab-size", 600),  # every word one token: no length bias
                 ("prepare", d, train_text, "--max-seq-length", 32, "--validation-split-percentage", 5),
                 ("train", d, "--max-steps", 2000, "--per-device-train-batch-size", 16, "--learning-rate", 5e-3,
                  "--warmup-steps", 10, "--logging-steps", 500, "--save-steps", 2000)):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
    pairs_file = tmp_path / "pairs.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minimal_pairs.py"), str(all_text), "-o",
                          str(pairs_file), "--skip-documents", "1000", "--per-set", "60"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pairs = read_pairs([pairs_file])
    assert len(pairs) == 360  # six sets of 60, none in the training text
    mdir = ModelDir(d)
    loaded = load_model(mdir.read_config())
    trained = accuracy(pairs, scorer_for(mdir, loaded, loaded.load_hf(mdir.weights_path)))["minimal_pairs_accuracy"]
    random = accuracy(pairs, scorer_for(mdir, loaded, loaded.init(jax.random.PRNGKey(0))))["minimal_pairs_accuracy"]
    assert random < 0.55, random  # the baseline is near chance: a margin it cannot reach by itself
    assert trained >= 0.57 and trained >= random + 0.06, (trained, random)
