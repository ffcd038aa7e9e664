"""mlmtool init DIR --from PATH: continue pre-training a model directory written by transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline import invoke, write_corpus

torch = pytest.importorskip("torch")

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _hf_tokenizer(corpus: Path):
    """A byte-level BPE built with the tokenizers library, as roberta-base's tokenizer.json is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=SPECIALS,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok, PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def _torch_model(vocab_size: int, seed: int = 0):
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return RobertaForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(PATH written by transformers' save_pretrained, the torch model, the corpus)."""
    root = tmp_path_factory.mktemp("from")
    corpus = write_corpus(root / "corpus.txt", n_docs=300)
    _, fast = _hf_tokenizer(corpus)
    model = _torch_model(len(fast))
    src = root / "hf-roberta"
    model.save_pretrained(src)
    fast.save_pretrained(src)
    return src, model, corpus


def _ids(path: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))(text)["input_ids"]


def _torch_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_init_from_copies_config_tokenizer_and_weights(source, tmp_path):
    from mlmtool.hf_weights import read_safetensors

    src, model, corpus = source
    d = tmp_path / "adapted"
    r = invoke("init", d, "--from", src, "--set", "hidden_dropout_prob=0.05")
    assert r.exit_code == 0, r.output
    assert "parameters" in r.stdout and "no 'mlmtool tokenizer' step" in r.stdout
    config = json.loads((d / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"]) == ("roberta", 32)
    assert config["vocab_size"] == model.config.vocab_size
    assert config["hidden_dropout_prob"] == 0.05
    text = "The king said good night to a woman of this house."
    assert _ids(d, text) == _ids(src, text)
    # init.safetensors holds PATH's weights, under the names transformers writes (tied decoder dropped).
    ours, theirs = read_safetensors(d / "init.safetensors"), _torch_state(model)
    assert set(theirs) - set(ours) <= {"lm_head.decoder.weight", "lm_head.decoder.bias",
                                       "roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids"}
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["init"]["args"]["from"] == str(src.resolve())

    # Idempotent; 'info' shows where the weights come from.
    r = invoke("init", d, "--from", src, "--set", "hidden_dropout_prob=0.05", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "unchanged"
    info = json.loads(invoke("info", d, "--json").stdout)
    assert info["init_weights"]["from"] == str(src.resolve())
    assert info["next"].startswith("mlmtool prepare")

    # The tokenizer step is refused: the weights belong to this tokenizer.
    r = invoke("tokenizer", d, corpus)
    assert r.exit_code == 1 and "init --from" in r.stderr and "--force" in r.stderr


@pytest.mark.slow
def test_train_starts_from_the_weights(source, tmp_path):
    """prepare -> the initial state is PATH's weights (logits equal torch's) -> train runs from it."""
    import jax
    import jax.numpy as jnp

    from mlmtool.data.blocks import BlockStore
    from mlmtool.hf_weights import read_safetensors
    from mlmtool.modeldir import ModelDir
    from mlmtool.training.train import TrainConfig, Trainer

    src, model, corpus = source
    d = tmp_path / "adapted"
    assert invoke("init", d, "--from", src).exit_code == 0
    r = invoke("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output
    # Before any training, eval and predict use PATH's weights (the baseline of the adaptation).
    r = invoke("eval", d, "--json", "--per-device-eval-batch-size", 8)
    assert r.exit_code == 0, r.output
    before = json.loads(r.stdout)
    assert before["checkpoint"] == "init (before training)" and np.isfinite(before["eval_loss"])
    assert invoke("eval", d, "--checkpoint", "export").exit_code == 1
    r = invoke("eval", d, "--json", "--per-device-eval-batch-size", 8, "--checkpoint", "init")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == before

    trainer = Trainer(ModelDir(d), TrainConfig(per_device_train_batch_size=8, max_steps=2))
    said = []
    state, start = trainer.initial_state(resume=True, force=False, say=said.append)
    assert start == 0 and "Starting from the weights" in said[0]
    theirs = _torch_state(model)
    emb = np.asarray(jax.device_get(state.params["embeddings"]["word_embeddings"]["embedding"]))
    np.testing.assert_array_equal(emb, theirs["roberta.embeddings.word_embeddings.weight"])
    kernel = np.asarray(jax.device_get(state.params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]))
    np.testing.assert_array_equal(kernel, theirs["roberta.encoder.layer.0.attention.self.query.weight"].T)
    # The loaded model is the PyTorch model: same logits on prepared blocks.
    ids = BlockStore.open(d / "data", "validation").read(np.arange(4)).astype(np.int32)
    ours = trainer.model.module.apply({"params": state.params}, jnp.asarray(ids), attention_mask=jnp.asarray(ids != 1))
    with torch.no_grad():
        want = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(ids != 1).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4)

    # Training runs from there: with a vanishing learning rate the export stays PATH's weights.
    r = invoke("train", d, "--max-steps", 2, "--per-device-train-batch-size", 8, "--learning-rate", 1e-9,
               "--weight-decay", 0, "--logging-steps", 1, "--save-steps", 2)
    assert r.exit_code == 0, r.output
    assert "Starting from the weights in" in r.stdout
    exported = read_safetensors(d / "model.safetensors")
    for key, value in exported.items():
        np.testing.assert_allclose(value, theirs[key], atol=1e-6, err_msg=key)
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "eval" and records[0]["checkpoint"] == "init (before training)"
    assert records[0]["step"] == 0
    first = next(r for r in records if "loss" in r)
    assert first["step"] == 1 and np.isfinite(first["loss"])
    r = invoke("eval", d, "--json", "--per-device-eval-batch-size", 8, "--checkpoint", "export")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval_loss"] == pytest.approx(before["eval_loss"], abs=1e-4)


def test_tokenizer_force_and_init_force_drop_the_weights(source, tmp_path):
    src, _, corpus = source
    d = tmp_path / "m"
    assert invoke("init", d, "--from", src).exit_code == 0
    r = invoke("tokenizer", d, corpus, "--force", "--vocab-size", 300)
    assert r.exit_code == 0, r.output
    assert not (d / "init.safetensors").exists() and "removed" in r.stderr
    assert invoke("init", d, "--from", src, "--force").exit_code == 0
    assert (d / "init.safetensors").exists()
    r = invoke("init", d, "--preset", "tiny", "--force")
    assert r.exit_code == 0, r.output
    assert not (d / "init.safetensors").exists() and "random weights" in r.stdout


def test_init_from_vocab_files_only(source, tmp_path):
    """A directory with vocab.json + merges.txt and no tokenizer.json (older roberta-base layout)."""
    src, _, _ = source
    old = Path(shutil.copytree(src, tmp_path / "old"))
    tok_json = json.loads((old / "tokenizer.json").read_text())
    (old / "vocab.json").write_text(json.dumps(tok_json["model"]["vocab"]))
    merges = tok_json["model"]["merges"]
    (old / "merges.txt").write_text("#version: 0.2\n" + "".join(
        (" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges))
    (old / "tokenizer.json").unlink()
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "RobertaTokenizer"
    (old / "tokenizer_config.json").write_text(json.dumps(cfg))
    d = tmp_path / "m"
    r = invoke("init", d, "--from", old)
    assert r.exit_code == 0, r.output
    assert (d / "tokenizer.json").exists()
    text = "The king said good night."
    assert _ids(d, text) == _ids(src, text)


def test_init_from_errors(source, tmp_path):
    src, _, _ = source
    r = invoke("init", tmp_path / "a", "--from", tmp_path / "missing")
    assert r.exit_code == 1 and "not a directory" in r.stderr
    r = invoke("init", tmp_path / "a", "--from", src, "--preset", "tiny")
    assert r.exit_code == 1 and "cannot be combined" in r.stderr
    r = invoke("init", tmp_path / "a", "--from", src, "--set", "hidden_size=64", "--set", "num_attention_heads=4")
    assert r.exit_code == 1 and "do not fit" in r.stderr
    pickled = Path(shutil.copytree(src, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors")))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    r = invoke("init", tmp_path / "b", "--from", pickled)
    assert r.exit_code == 1 and "no model.safetensors" in r.stderr and "save_pretrained" in r.stderr
    assert invoke("init", tmp_path / "c", "--preset", "tiny").exit_code == 0
    r = invoke("init", tmp_path / "c", "--from", src)
    assert r.exit_code == 1 and "--force" in r.stderr
