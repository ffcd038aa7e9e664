"""``mlmtool export DIR OUT``: a clean folder to publish, and ``--push-to-hub``.

DIR holds mlmtool's state beside the model (``checkpoints/`` with the optimizer state,
``data/`` with the tokenized corpus, logs, the lock); OUT holds only what a Hugging Face
repository of the family holds: ``config.json`` (with ``architectures``, ``dtype`` and
``transformers_version``), the tokenizer files, ``model.safetensors`` and a generated
``README.md`` model card (:mod:`mlmtool.model_card`).  OUT is written whole into a
temporary folder beside it and renamed into place, so it appears complete or not at all.

The weights are DIR's ``model.safetensors`` (copied byte for byte), or with ``checkpoint``
those of a checkpoint (``latest``, a step; ``init``), converted as ``train`` exports them
(BERT's imported pooler carried along).  ``push_to_hub`` uploads OUT with
``huggingface_hub``'s ``upload_folder`` and the usual token (``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mlmtool.errors import ConfigError, MlmtoolError, ModelDirError
from mlmtool.modeldir import (CONFIG, TOKENIZER_EXTRA, TOKENIZER_FILES, WEIGHTS, ModelDir, atomic_directory,
                              atomic_write_json, with_transformers_version)

CARD = "README.md"


def exported_files(mdir: ModelDir) -> list[str]:
    """What OUT holds: config, tokenizer files (a vocabulary file ``init --from`` copied
    too), weights and the card."""
    extra = [name for name in TOKENIZER_EXTRA if (mdir.path / name).is_file()]
    # transformers v5's save_pretrained writes no special_tokens_map.json (tokenizer_config.json
    # holds the special tokens): a DIR made with init --from of such a PATH has none to export
    tokenizer = [name for name in TOKENIZER_FILES if name != "special_tokens_map.json" or (mdir.path / name).is_file()]
    return [CONFIG, *tokenizer, *extra, WEIGHTS, CARD]


def check_destination(mdir: ModelDir, out: Path, force: bool) -> None:
    """OUT is neither DIR nor inside it nor around it; a non-empty OUT needs ``force``."""
    here, there = mdir.path.resolve(), out.resolve()
    if there == here or here in there.parents:
        raise ModelDirError(f"{out} is inside the model directory {mdir}",
                            "export to a folder outside DIR (the export is what DIR holds, without the rest)")
    if there in here.parents:
        raise ModelDirError(f"{out} contains the model directory {mdir}", "export to a folder outside DIR")
    if out.exists() and not out.is_dir():
        raise ModelDirError(f"{out} exists and is not a directory", "choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelDirError(f"{out} is not empty", "choose an empty or new OUT, or pass --force to replace it")
    if not out.parent.is_dir():
        raise ModelDirError(f"cannot create {out}: {out.parent} does not exist", "create the parent folder first")


def _check_text(flag: str, value: str | None) -> None:
    if value is not None and (not value.strip() or any(c in value for c in "\n\r\"")):
        raise ConfigError(f"{flag} {value!r} is not a single word or code", f"e.g. {flag} apache-2.0"
                          if flag == "--license" else f"e.g. {flag} en")


def _carried_keys(path: Path, table) -> list[str]:
    """Keys of ``path`` the family carries unchanged (BERT's pooler); names only, no tensors read."""
    if not table.carried or not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return [k for k in f.keys() if re.search(table.carried, table.canonical(k))]


def _write_weights(mdir: ModelDir, config: dict, checkpoint: str | None, target: Path) -> str:
    """model.safetensors into ``target``; returns what it came from ("export", "step N", ...)."""
    if checkpoint is None:
        if not mdir.weights_path.is_file():
            raise ModelDirError(f"no {WEIGHTS} in {mdir}",
                                f"run 'mlmtool train {mdir}' first, or export a checkpoint with --checkpoint latest")
        shutil.copyfile(mdir.weights_path, target)
        return "export"
    import jax
    from jax.sharding import SingleDeviceSharding

    from mlmtool.training.checkpoint import load_params
    from mlmtool.models import load_model

    loaded = load_model(config)
    device = SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    sharding = jax.tree_util.tree_map(lambda _: device, loaded.abstract_params)
    params, what = load_params(mdir, loaded, checkpoint, None, sharding, config=config)
    loaded.save_hf(jax.device_get(params), target, carry_from=mdir.carried_weights)
    return what


def export_model(model_dir: ModelDir | str | os.PathLike, out: str | os.PathLike, *, checkpoint: str | None = None,
                 license: str | None = None, languages: tuple[str, ...] = (), force: bool = False,
                 name: str | None = None) -> dict[str, Any]:
    """Write OUT (see the module docstring); ``name`` is what the card's examples load (the
    hub repository id, else OUT's folder name).  Returns what was written."""
    from mlmtool import model_card
    from mlmtool.info import directory_info
    from mlmtool.models import family_for
    from mlmtool.presets import parameter_count
    from mlmtool.report import summarize

    mdir = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    out = Path(out)
    _check_text("--license", license)
    for language in languages:
        _check_text("--language", language)
    check_destination(mdir, out, force)
    config = mdir.read_config()
    mdir.require_tokenizer()
    family = family_for(config["model_type"])
    files = exported_files(mdir)
    info = directory_info(mdir)
    tok_config = {}
    try:
        tok_config = json.loads((mdir.path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    defaults = family.tokenizer[config["model_type"]]
    mask = tok_config.get("mask_token")
    mask = mask.get("content") if isinstance(mask, dict) else mask
    mask = mask if isinstance(mask, str) else defaults.specials_for(defaults.algorithm).mask
    summary = summarize(mdir) if mdir.metrics_path.exists() else {}

    with atomic_directory(out) as tmp:
        source = _write_weights(mdir, config, checkpoint, tmp / WEIGHTS)
        atomic_write_json(tmp / CONFIG, with_transformers_version(config))
        for file in files:
            if file not in (CONFIG, WEIGHTS, CARD):
                shutil.copyfile(mdir.path / file, tmp / file)
        table = family.weight_table(family.parse_config(config))
        pooler = None
        if _carried_keys(tmp / WEIGHTS, table):
            pooler = mdir.init_source() or f"the earlier {WEIGHTS} of DIR"
            pooler = Path(pooler).name if os.path.isabs(pooler) else pooler
        card = model_card.model_card(
            info=info, manifest=mdir.read_manifest(), summary=summary, mask_token=mask,
            parameters=parameter_count(config), architecture=family.architecture(config["model_type"]),
            name=name or out.resolve().name, license=license, languages=list(languages), pooler=pooler,
            checkpoint=source if source != "export" else f"DIR's {WEIGHTS}")
        (tmp / CARD).write_text(card, encoding="utf-8")
        written = sorted(p.name for p in tmp.iterdir())
    return {"out": str(out), "files": written, "weights_from": source, "model_type": config["model_type"],
            "parameters": parameter_count(config)}


# --------------------------------------------------------------------------- the hub


def hub_client(repo_id: str):
    """An ``HfApi`` with the user's token, after checking what can be checked offline: the
    package, the repository id's form and that a token is there."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise ConfigError("--push-to-hub needs huggingface_hub", "pip install huggingface_hub") from None
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"--push-to-hub {repo_id!r} is not a repository id ({e})",
                          "use e.g. --push-to-hub your-name/my-model") from None
    if "/" not in repo_id:
        raise ConfigError(f"--push-to-hub {repo_id!r} names no owner", "use e.g. --push-to-hub your-name/my-model")
    token = huggingface_hub.get_token()
    if not token:
        raise ConfigError("no Hugging Face token for --push-to-hub",
                          "set HF_TOKEN, or run 'hf auth login'")
    return huggingface_hub.HfApi(token=token)


def push_to_hub(api, folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                revision: str | None = None) -> str:
    """Create the repository if needed (``private``), the branch ``revision`` if given,
    and upload ``folder`` with ``upload_folder``; returns the commit's URL."""
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                   commit_message="Upload model exported by mlmtool")
    except MlmtoolError:
        raise
    except Exception as e:  # the network, the hub's answer (permissions, quota): one line
        text = " ".join(str(e).split())[:300] or e.__class__.__name__
        raise ModelDirError(f"cannot upload {folder} to {repo_id} ({text})",
                            "check the network, the token's write permission and the repository id; "
                            f"the export in {folder} is complete") from None
    return str(getattr(commit, "commit_url", None) or commit)
