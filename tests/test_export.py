"""``mlmtool export DIR OUT``: only the files of a hub repository, loading as one
(``AutoModelForMaskedLM``, no missing or unexpected key), fine-tuning as one (``Trainer``,
sequence and token classification, every model_type of the registry), a model card, its
refusals, and ``--push-to-hub`` up to the network call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlmtool import models
from mlmtool.data.corpus import open_corpus
from mlmtool.modeldir import ModelDir
from mlmtool.presets import build_config
from mlmtool.data.tokenizer_train import train_tokenizer
from tests.conftest import make_documents, write_documents
from tests.pipeline import invoke, trained_dir

pytestmark = pytest.mark.slow  # exports of trained directories loaded in torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

HUB_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "model.safetensors", "README.md"}
# One tiny config per model_type (the first of its family's cases: the export and the
# tokenizer class depend on the model_type, not on a family's variants).
CASES: dict[str, dict] = {}
for _family in models.families().values():
    for _fields in _family.tiny_test_configs().values():
        CASES.setdefault(_fields["model_type"], _fields)


def one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return " ".join(lines)


def _loading_info(out):
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    return model, {k: sorted(v) for k, v in info.items() if k != "error_msgs"}


# -- every family: an initialised model, exported, loaded and fine-tuned ----------------------

@pytest.fixture(scope="module", params=sorted(CASES))
def family_dir(request, tmp_path_factory):
    """DIR of one model_type: config, tokenizer (trained), model.safetensors (initialised)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    cfg = root / "config.json"
    cfg.write_text(json.dumps({**CASES[model_type], "vocab_size": 400}), encoding="utf-8")
    d = root / "model"
    ModelDir(d, create=True).write_config(build_config(from_config=cfg))
    corpus = write_documents(root / "corpus.txt", make_documents(150))
    train_tokenizer(d, open_corpus([str(corpus)]), vocab_size=400, min_frequency=1, show_progress=False)
    mdir = ModelDir(d)
    loaded = models.load_model(mdir.read_config())
    loaded.save_hf(loaded.init(0), mdir.weights_path)
    return model_type, d


def test_export_is_a_hub_repository(family_dir, tmp_path):
    model_type, d = family_dir
    out = tmp_path / "out"
    r = invoke("export", d, out, "--license", "apache-2.0", "--language", "en")
    assert r.exit_code == 0, (r.output, r.exception)
    assert {p.name for p in out.iterdir()} == HUB_FILES
    model, info = _loading_info(out)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    family = models.family_for(model_type)
    assert type(model).__name__ == family.architecture(model_type)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == [family.architecture(model_type)]
    assert config["transformers_version"] == transformers.__version__ and config["dtype"] == "float32"
    assert (out / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text(encoding="utf-8")
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in head and "pipeline_tag: fill-mask" in head
    assert 'license: "apache-2.0"' in head and '- "en"' in head and f'- "{model_type}"' in head
    mask = transformers.AutoTokenizer.from_pretrained(str(out)).mask_token
    assert f"The capital of France is {mask}." in body and f"{family.architecture(model_type)}" in body
    fill = transformers.pipeline("fill-mask", model=str(out))
    assert len(fill(f"the house {mask} garden")) == 5  # the card's example runs


def _finetune(model, tokenizer, features, tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "ft"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    collator = (transformers.DataCollatorForTokenClassification(tokenizer)
                if "word_labels" in features else transformers.DataCollatorWithPadding(tokenizer))
    rows = [{k: v for k, v in f.items() if k != "word_labels"} for f in features["rows"]]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    out = trainer.train()
    assert np.isfinite(out.training_loss)
    return out


def test_trainer_fine_tunes_the_export(family_dir, tmp_path):
    """Sequence classification on sentence pairs and token classification on pre-split words
    (RoBERTa-style tokenizers with add_prefix_space=True, the usual NER recipe), a few steps."""
    model_type, d = family_dir
    out = tmp_path / "out"
    assert invoke("export", d, out).exit_code == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    docs = make_documents(16, seed=1, max_words=8)
    pairs = [tok(a, b, truncation=True, max_length=32) | {"labels": i % 2} for i, (a, b) in
             enumerate(zip(docs[::2], docs[1::2]))] * 2
    if model_type == "bert":
        assert all(1 in p["token_type_ids"] for p in pairs)  # the second segment is marked
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=2)
    _finetune(model, tok, {"rows": pairs}, tmp_path)

    byte_level = models.family_for(model_type).tokenizer[model_type].algorithm == "bpe"
    tok = transformers.AutoTokenizer.from_pretrained(str(out), **({"add_prefix_space": True} if byte_level else {}))
    rows = []
    for i, doc in enumerate(docs):
        words = doc.split()
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=32)
        labels = [-100 if w is None else (w + i) % 3 for w in enc.word_ids()]
        rows.append(dict(enc) | {"labels": labels})
    model = transformers.AutoModelForTokenClassification.from_pretrained(str(out), num_labels=3)
    _finetune(model, tok, {"rows": rows, "word_labels": True}, tmp_path)


# -- a trained DIR: checkpoints, refusals, the card's training facts -----------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_dir(tmp_path_factory)


def test_export_of_a_trained_dir_leaves_its_state_behind(trained, tmp_path):
    out = tmp_path / "out"
    r = invoke("export", trained, out, "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output)["files"]) == HUB_FILES  # no checkpoints/, data/, metrics, lock, manifest
    card = (out / "README.md").read_text(encoding="utf-8")
    manifest = json.loads((trained / "manifest.json").read_text(encoding="utf-8"))
    for fact in ("corpus.txt", f"{manifest['prepare']['outputs']['tokens']['train']:,}", "tokens seen",
                 "mlmtool train DIR --per-device-train-batch-size 8", "eval_loss", "## Evaluation"):
        assert fact in card, fact


def test_export_of_a_checkpoint(trained, tmp_path):
    from safetensors.numpy import load_file

    final = load_file(str(trained / "model.safetensors"))
    assert invoke("export", trained, tmp_path / "latest", "--checkpoint", "latest").exit_code == 0
    latest = load_file(str(tmp_path / "latest" / "model.safetensors"))
    assert latest.keys() == final.keys() and all(np.array_equal(latest[k], final[k]) for k in final)
    assert invoke("export", trained, tmp_path / "ten", "--checkpoint", "10").exit_code == 0
    ten = load_file(str(tmp_path / "ten" / "model.safetensors"))
    assert not all(np.array_equal(ten[k], final[k]) for k in final)  # step 10, not the end
    assert "step 10" in (tmp_path / "ten" / "README.md").read_text(encoding="utf-8")
    _, info = _loading_info(tmp_path / "ten")
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def _tree(d):
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*"))


def test_refusals_leave_everything_as_it_was(trained, tmp_path):
    before = _tree(trained)
    for out, what in ((trained, "inside the model directory"), (trained / "sub", "inside the model directory"),
                      (trained.parent, "contains the model directory")):
        assert what in one_error_line(invoke("export", trained, out))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "not empty" in one_error_line(invoke("export", trained, full))
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert "--private and --revision go with --push-to-hub" in one_error_line(
        invoke("export", trained, tmp_path / "x", "--private"))
    assert "no checkpoint at step 7" in one_error_line(invoke("export", trained, tmp_path / "x", "--checkpoint", "7"))
    assert "is not a single word" in one_error_line(invoke("export", trained, tmp_path / "x", "--license", "a\nb"))
    assert not (tmp_path / "x").exists()
    assert _tree(trained) == before
    r = invoke("export", trained, full, "--force")  # --force replaces OUT whole
    assert r.exit_code == 0 and {p.name for p in full.iterdir()} == HUB_FILES
    untrained = tmp_path / "untrained"
    shutil.copytree(trained, untrained, ignore=shutil.ignore_patterns("model.safetensors"))
    assert "no model.safetensors" in one_error_line(invoke("export", untrained, tmp_path / "y"))


# -- --push-to-hub: everything up to the network ------------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub's network calls replaced by recorders; a token that is there."""
    import huggingface_hub

    calls = []
    for name in ("create_repo", "create_branch", "upload_folder"):
        def record(self, *args, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            if _name == "upload_folder":
                calls.append(("files", sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()), {}))
                return "https://huggingface.co/me/model/commit/abc"
        monkeypatch.setattr(huggingface_hub.HfApi, name, record)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    return calls


def test_push_to_hub_uploads_the_export(trained, tmp_path, fake_hub):
    out = tmp_path / "out"
    r = invoke("export", trained, out, "--push-to-hub", "me/model", "--private", "--revision", "dev")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "Uploaded to me/model" in r.output
    names = [c[0] for c in fake_hub]
    assert names == ["create_repo", "create_branch", "upload_folder", "files"]
    assert fake_hub[0][1] == ("me/model",) and fake_hub[0][2]["private"] is True
    assert fake_hub[1][2]["branch"] == "dev"
    upload = fake_hub[2][2]
    assert upload["folder_path"] == str(out) and upload["repo_id"] == "me/model" and upload["revision"] == "dev"
    assert upload["repo_type"] == "model"
    assert set(fake_hub[3][1]) == HUB_FILES
    assert 'model="me/model"' in (out / "README.md").read_text(encoding="utf-8")  # the card loads the repo


def test_push_to_hub_checks_before_writing(trained, tmp_path, fake_hub, monkeypatch):
    import huggingface_hub

    assert "is not a repository id" in one_error_line(invoke("export", trained, tmp_path / "a", "--push-to-hub",
                                                             "me/bad name!"))
    assert "names no owner" in one_error_line(invoke("export", trained, tmp_path / "a", "--push-to-hub", "model"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    line = one_error_line(invoke("export", trained, tmp_path / "a", "--push-to-hub", "me/model"))
    assert "HF_TOKEN" in line and "hf auth login" in line
    assert not (tmp_path / "a").exists() and fake_hub == []


def test_push_failure_is_one_line_and_keeps_the_export(trained, tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(self, *args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    line = one_error_line(invoke("export", trained, tmp_path / "out", "--push-to-hub", "me/model"))
    assert "hub unreachable" in line and "complete" in line
    assert {p.name for p in (tmp_path / "out").iterdir()} == HUB_FILES


# -- BERT's pooler: imported by init --from, kept through training and export ------------------

def test_an_imported_pooler_is_kept_through_training_and_export(tmp_path):
    from safetensors.numpy import load_file

    from tests.pipeline import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=120)
    src0 = tmp_path / "src0"
    sets = [a for s in ("hidden_size=32", "num_attention_heads=2", "intermediate_size=64", "num_hidden_layers=2",
                        "max_position_embeddings=66") for a in ("--set", s)]
    assert invoke("init", src0, "--preset", "bert-tiny", *sets).exit_code == 0
    assert invoke("tokenizer", src0, corpus, "--vocab-size", 200).exit_code == 0
    config = json.loads((src0 / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    source = transformers.BertForPreTraining(transformers.BertConfig(**config))  # pooler and NSP head
    src = tmp_path / "src"
    source.save_pretrained(str(src))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(src0 / name, src / name)
    pooler = {k: v.numpy() for k, v in source.state_dict().items() if k.startswith("bert.pooler.")}
    assert set(pooler) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}

    d = tmp_path / "model"
    for args in (("init", d, "--from", src), ("prepare", d, corpus, "--max-seq-length", 32),
                 ("train", d, "--max-steps", 3, "--per-device-train-batch-size", 4, "--save-steps", 3,
                  "--eval-steps", 3, "--learning-rate", 1e-2)):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    trained = load_file(str(d / "model.safetensors"))
    for key, value in pooler.items():
        assert np.array_equal(trained[key], value), key
    assert not np.allclose(trained["bert.encoder.layer.0.output.dense.weight"],
                           source.state_dict()["bert.encoder.layer.0.output.dense.weight"].numpy())  # it trained

    for args in ((), ("--checkpoint", "latest")):
        out = tmp_path / ("out" + "".join(args))
        assert invoke("export", d, out, *args).exit_code == 0
        model, info = transformers.BertForSequenceClassification.from_pretrained(
            str(out), num_labels=2, output_loading_info=True)
        assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
        assert all(k.startswith("cls.predictions.") for k in info["unexpected_keys"])  # the MLM head
        for key, value in pooler.items():
            assert np.array_equal(model.state_dict()[key].numpy(), value), key
        _, info = _loading_info(out)  # *ForMaskedLM has no pooler: transformers names those two keys
        assert info["missing_keys"] == [] and info["unexpected_keys"] == sorted(pooler)
        assert "The pooler (`bert.pooler.dense`) is the one of `src`" in (out / "README.md").read_text()


def test_a_bert_from_scratch_says_it_has_no_pooler(tmp_path):
    from mlmtool.model_card import model_card

    card = model_card(info={"config": {"model_type": "bert"}}, manifest={}, summary={}, mask_token="[MASK]",
                      parameters=1, architecture="BertForMaskedLM", name="m", license=None, languages=[],
                      pooler=None, checkpoint="export")
    assert "has no pooler" in card and "initialises `bert.pooler.dense` at random" in card


def test_export_help_imports_nothing_heavy():
    from tests.pipeline import heavy_imports

    assert heavy_imports("export", "--help") == []
