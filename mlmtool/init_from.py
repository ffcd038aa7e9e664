"""``mlmtool init DIR --from PATH``: continue pre-training an existing model (domain adaptation).

PATH is a Hugging Face model directory of a supported family on disk (``config.json``, the tokenizer
files, ``model.safetensors`` or a sharded ``model.safetensors.index.json``).  ``init``
copies its config and tokenizer into DIR and converts its weights into
``DIR/init.safetensors`` (checked against the config, normalised to the key names and
float32 that mlmtool writes).  ``train`` then starts from those weights instead of a random
initialisation when DIR has no checkpoint yet (:func:`initial_params`); ``mlmtool
tokenizer`` refuses to replace the tokenizer, since the weights belong to it.

PyTorch ``pytorch_model.bin`` files are not read: they are pickles, which can run code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from mlmtool import presets
from mlmtool.errors import CheckpointError, ConfigError, DataError, ModelDirError
from mlmtool.hf_weights import read_parts, safetensors_files, table_parts
from mlmtool.modeldir import TOKENIZER_EXTRA, TOKENIZER_FILES, ModelDir
from mlmtool.models import load_model
from mlmtool.data.tokenizer_facts import tokenizer_info



_TIED_ONLY = "mlmtool trains models whose MLM decoder is tied to the embeddings"


def _weight_files(src: Path) -> list[Path]:
    try:
        return safetensors_files(src)
    except CheckpointError:
        pickled = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if (src / n).exists()]
        hint = (f"{src} has only {', '.join(pickled)}; convert it to safetensors first (in Python: "
                "AutoModelForMaskedLM.from_pretrained(PATH).save_pretrained(NEW_PATH))"
                if pickled else "PATH must be a model directory with model.safetensors")
        raise CheckpointError(f"no model.safetensors in {src}", hint) from None


def _fingerprint(files: list[Path]) -> list[dict]:
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _stage_tokenizer(src: Path, tmp: Path) -> None:
    """PATH's tokenizer files into ``tmp`` (converted to tokenizer.json by transformers if
    PATH has only the vocab files)."""
    if (src / "tokenizer.json").is_file():
        for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRA):  # the vocab files serve classes that rebuild from them
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        return
    try:
        from transformers import AutoTokenizer  # only for a PATH without tokenizer.json (slow to import)

        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tmp))
    except Exception as e:
        raise ModelDirError(f"cannot load the tokenizer of {src} ({e.__class__.__name__}: {e})",
                            "PATH must hold tokenizer.json, or vocab.json + merges.txt, or vocab.txt") from None
    if not (tmp / "tokenizer.json").is_file():
        raise ModelDirError(f"transformers wrote no tokenizer.json for the tokenizer of {src}",
                            "save a fast tokenizer into PATH first")


def init_from(mdir: ModelDir, source: os.PathLike | str, *, overrides: list[str] = (), force: bool = False,
              say: Callable = lambda *a, **k: None) -> dict[str, Any]:
    """Copy config and tokenizer of the model directory ``source`` into DIR and convert its
    weights to ``DIR/init.safetensors``.  Returns the config and a status."""
    src = Path(source)
    if not src.is_dir():
        raise ModelDirError(f"--from {src}: not a directory",
                            "pass a Hugging Face model directory (config.json, tokenizer, model.safetensors)")
    if not (src / "config.json").is_file():
        raise ModelDirError(f"--from {src}: no config.json", "pass a Hugging Face model directory")
    if src.resolve() == mdir.path.resolve():
        raise ModelDirError("--from names DIR itself", "pass the directory of the model to start from")
    try:
        config = presets.build_config(overrides=list(overrides), from_config=src / "config.json")
    except ConfigError as e:
        if e.message.startswith("config tie_word_embeddings="):  # "set it to True" alone would not do
            hint = (f"{_TIED_ONLY}: --set tie_word_embeddings=true imports {src} if its decoder equals its "
                    "embeddings (it is checked), else continue the model with transformers")
            raise ConfigError(e.message, hint) from None
        raise
    files = _weight_files(src)
    fingerprint = _fingerprint(files)

    previous = mdir.read_manifest().get("init") or {}
    existing = None
    if mdir.config_path.exists():
        try:
            existing = mdir.read_config()
        except Exception:
            existing = None
    same_source = ((previous.get("args") or {}).get("from") == str(src.resolve())
                   and previous.get("inputs") == fingerprint)
    if (not force and existing == config and same_source and mdir.init_weights_path.exists()
            and mdir.tokenizer_path.exists()):  # --force copies again (a damaged tokenizer file, say)
        return {"config": config, "status": "unchanged", "source": str(src.resolve())}
    if existing is not None and existing != config and not force:
        raise ModelDirError(f"{mdir.config_path} already exists with a different config",
                            "pass --force to overwrite it (or choose another DIR)")
    if mdir.tokenizer_path.exists() and not same_source and not force:
        raise ModelDirError(f"{mdir} already has a tokenizer", "pass --force to replace it with the one of --from")

    loaded = load_model(config)
    try:
        # with the parts beside it (an ELECTRA pair's generator/); BERT's pooler is carried below
        source_state = read_parts(src, table_parts(loaded.weight_table))
        params = loaded.from_hf(source_state)
    except CheckpointError as e:
        with_set = " with --set" if overrides else ""
        if "untied" in e.message:
            hint = f"{_TIED_ONLY}: continue this model with transformers"
        elif overrides:
            hint = "only --set options that keep the parameter shapes (e.g. dropout) can be combined with --from"
        else:  # no --set to drop: the source itself is inconsistent
            hint = f"{src / 'config.json'} does not describe the weights beside it: fix it, or save the model again"
        raise CheckpointError(f"the weights in {src} do not fit its config{with_set}: {e.message}", hint) from None
    with mdir.tokenizer_staging() as tmp:  # config.json is written with the tokenizer, just before tokenizer.json
        _stage_tokenizer(src, tmp)
        tokenizer_files = [p.name for p in mdir.install_tokenizer(tmp, config=config)]
    _check_tokenizer(mdir, config)
    table = loaded.weight_table  # what the family carries unchanged (BERT's pooler) goes along
    carried = {table.canonical(k): v for k, v in source_state.items()
               if table.carried and re.search(table.carried, table.canonical(k))}
    loaded.save_hf(params, mdir.init_weights_path, carried=carried)
    mdir.record("init", args={"preset": None, "set": list(overrides), "from_config": None, "from": str(src.resolve())},
                inputs=fingerprint, outputs={"init_weights": mdir.init_weights_path.name, "tokenizer": tokenizer_files})
    stale = [name for name in ("data", "checkpoints", "model.safetensors") if (mdir.path / name).exists()]
    return {"config": config, "status": "written", "source": str(src.resolve()), "stale": stale,
            "tokenizer_files": tokenizer_files}


def _check_tokenizer(mdir: ModelDir, config: dict) -> None:
    try:
        tok = tokenizer_info(mdir)
    except DataError as e:
        raise ModelDirError(f"the tokenizer copied from --from is unusable: {e.message}",
                            "check PATH's tokenizer files") from None
    if tok.vocab_size > config["vocab_size"]:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model only {config['vocab_size']} "
                          "embeddings", "PATH's tokenizer and weights do not belong together")
    if tok.pad_token_id != config["pad_token_id"]:
        raise ConfigError(f"the tokenizer's pad token id {tok.pad_token_id} differs from config.json's "
                          f"pad_token_id {config['pad_token_id']}", "fix PATH's config.json")


def exported_params(mdir: ModelDir, loaded, *, resume: bool, force: bool, say: Callable = lambda *a, **k: None):
    """Host params of ``DIR/model.safetensors`` when DIR has no checkpoint to resume from (a
    directory written by transformers' ``save_pretrained``, or one whose checkpoints were
    deleted): training continues from those weights, as from ``init --from``'s, instead of
    silently overwriting them with a random initialisation.  None when there is no such file,
    or with ``--no-resume --force`` (start over; the file is replaced at the end)."""
    path = mdir.weights_path
    if not path.exists():
        return None
    other = (f"the weights of {mdir.init_weights_path.name} ('init --from')" if mdir.init_weights_path.exists()
             else "random weights")
    if not resume:
        if force:
            return None
        raise ModelDirError(f"{path} holds trained weights that --no-resume would replace with {other}",
                            "drop --no-resume to continue from them, or add --force to start over")
    try:
        params = loaded.load_hf(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path} does not fit config.json ({e.message}), and training would overwrite it",
                              f"restore the config.json those weights were made with, or start from {other} "
                              "with --no-resume --force (replaces the file)") from None
    say(f"Starting from the weights in {path} (no checkpoint in {mdir.checkpoints_dir}); "
        f"--no-resume --force starts from {other} instead")
    return params


def initial_params(mdir: ModelDir, loaded, say: Callable = lambda *a, **k: None):
    """Host params from ``DIR/init.safetensors`` (written by ``init --from``), or None."""
    path = mdir.init_weights_path
    if not path.exists():
        return None
    try:
        params = loaded.load_hf(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path} does not fit config.json: {e.message}",
                              f"config.json changed since 'mlmtool init {mdir.path} --from'; run it again "
                              f"(or delete {path} to train from random weights)") from None
    source = mdir.init_source()
    say(f"Starting from the weights in {path}" + (f" (from {source})" if source else ""))
    return params
