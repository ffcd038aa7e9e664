"""``mlmtool info DIR``: what a model directory holds, at any stage.

Reads only small files (JSON, tokenizer.json, file sizes): no JAX, no checkpoint
restore, so it answers at once even for a large model, and it works on a directory that
has only a config.json, or even on a damaged one (each part reports its own error).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from mlmtool import models
from mlmtool.runtime.lock import holder_alive
from mlmtool.modeldir import ModelDir, checkpoint_steps
from mlmtool.report import read_metrics
from mlmtool.training.stages import PENDING, numbers


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _mtime(path: Path) -> str:
    return _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="seconds")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def config_info(mdir: ModelDir) -> dict | None:
    """The model's family and sizes, from config.json (HF's defaults for fields left out)."""
    if not mdir.config_path.exists():
        return None
    try:
        config = mdir.read_config()
        family = models.family_for(config["model_type"])
        return {"family": family.name, **family.summary(config), "parameters": family.parameter_count(config),
                "max_sequence_length": family.max_sequence_length(config),
                "pad_token_id": config.get("pad_token_id")}
    except Exception as e:
        return {"error": f"{e.__class__.__name__}: {e}"}


def tokenizer_info(mdir: ModelDir) -> dict | None:
    path = mdir.tokenizer_path
    if not path.exists():
        return None
    try:
        raw = _read_json(path)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        model_type = (raw.get("model") or {}).get("type", "?")
        pre = json.dumps(raw.get("pre_tokenizer") or {})
        kind = {"BPE": "byte-level BPE" if "ByteLevel" in pre else "BPE"}.get(model_type, model_type)
        norm = json.dumps(raw.get("normalizer") or {})
        lowercase = '"Lowercase"' in norm or '"lowercase": true' in norm
        specials = {t["content"]: t["id"] for t in raw.get("added_tokens", []) if t.get("special")}
        out = {"type": kind, "vocab_size": tok.get_vocab_size(with_added_tokens=True), "lowercase": lowercase,
               "special_tokens": specials}
        cfg_path = mdir.path / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = _read_json(cfg_path)
            out["model_max_length"] = cfg.get("model_max_length")
            out["mask_token"] = cfg.get("mask_token") if isinstance(cfg.get("mask_token"), str) else None
        return out
    except Exception as e:
        return {"error": f"{e.__class__.__name__}: {e}"}


def data_fingerprint(meta: dict) -> dict | None:
    from mlmtool.data.shards import fingerprint  # numpy and the tokenizing pool: only when DIR has data

    return fingerprint(meta)


def data_info(mdir: ModelDir) -> dict | None:
    meta_path = mdir.data_dir / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = _read_json(meta_path)
        fp = meta.get("fingerprint") or {}
        inputs = fp.get("files") if isinstance(fp, dict) else None
        return {
            "seq_len": meta.get("seq_len"),
            "blocks": meta.get("num_blocks"),
            "tokens": meta.get("tokens"),
            "documents": meta.get("documents"),
            "line_by_line": meta.get("line_by_line"),
            "validation_split_percentage": meta.get("validation_split_percentage"),
            "dtype": meta.get("dtype"),
            "vocab_size": meta.get("vocab_size"),
            "inputs": len(inputs) if isinstance(inputs, list) else (fp.get("dataset") if isinstance(fp, dict)
                                                                    else None),
            "bytes": _dir_bytes(mdir.data_dir),
            "num_shards": meta.get("num_shards", 1),
            "fingerprint": data_fingerprint(meta),  # per split, a digest of the blocks (mlmtool.data.shards)
        }
    except Exception as e:
        return {"error": f"{e.__class__.__name__}: {e}"}


def checkpoints_info(mdir: ModelDir, root: Path | None = None) -> dict | None:
    """Committed orbax checkpoints (folders named by their step) and the newest one's metadata
    (of DIR/checkpoints, or of ``root``: an earlier stage's, mlmtool.training.stages)."""
    root = mdir.checkpoints_dir if root is None else root
    if not root.is_dir():
        return None
    steps = checkpoint_steps(root)
    if not steps:
        return None
    out: dict[str, Any] = {"steps": steps, "latest": steps[-1], "bytes": _dir_bytes(root)}
    meta_file = root / str(steps[-1]) / "meta" / "metadata"  # orbax's JsonCheckpointHandler file
    try:
        meta = _read_json(meta_file)
        out["total_steps"] = meta.get("total_steps")
        out["epoch"] = meta.get("epoch")
        out["global_batch"] = (meta.get("run") or {}).get("global_batch")
        out["tokens_seen"] = meta.get("tokens_seen")
        out["started_from"] = meta.get("started_from")  # the checkpoint this stage started from
    except Exception:
        pass
    return out


def _file(path: Path) -> dict | None:
    if not path.exists():
        return None
    return {"path": str(path), "bytes": path.stat().st_size, "modified": _mtime(path)}


def metrics_info(mdir: ModelDir) -> dict | None:
    if not mdir.metrics_path.exists():
        return None
    train, evals, bad = read_metrics(mdir.metrics_path)
    out: dict[str, Any] = {"train_records": len(train), "eval_records": len(evals)}
    if train:
        out["last_train"] = {k: train[-1].get(k) for k in ("step", "epoch", "loss", "accuracy", "learning_rate",
                                                             "tokens_per_second", "tokens_seen") if k in train[-1]}
    if evals:
        out["last_eval"] = {k: evals[-1].get(k) for k in ("step", "eval_loss", "eval_accuracy", "perplexity")}
    if bad:
        out["unreadable_lines"] = bad
    return out


def next_step(info: dict) -> str:
    d = info["path"]
    if info["config"] is None:
        return f"mlmtool init {d}"
    if info["tokenizer"] is None:
        return f"mlmtool tokenizer {d} FILE..."
    if info["data"] is None:
        return f"mlmtool prepare {d} FILE..."
    if info.get("pending_stage"):
        return f"mlmtool train {d}  (finishes the start of the interrupted stage, or drops its unfinished step 0)"
    ck, export = info["checkpoints"], info["export"]
    if ck is None and export is None:
        return f"mlmtool train {d}"
    if ck is not None and ck.get("total_steps") and ck["latest"] < ck["total_steps"]:
        return f"mlmtool train {d}  (resumes at step {ck['latest']:,} of {ck['total_steps']:,})"
    if info["eval_results"] is None:
        return f"mlmtool eval {d}"
    return f"mlmtool predict {d} TEXT  /  mlmtool report {d}"


def directory_info(mdir: ModelDir) -> dict[str, Any]:
    """Everything ``mlmtool info`` shows, as a JSON-able dict (None for what is absent)."""
    info: dict[str, Any] = {"path": str(mdir.path)}
    info["config"] = config_info(mdir)
    info["tokenizer"] = tokenizer_info(mdir)
    info["data"] = data_info(mdir)
    info["data_stores"] = {name: data_info(mdir.with_data(name)) for name in mdir.data_names()}  # prepare --name
    info["checkpoints"] = checkpoints_info(mdir)
    stages = mdir.stages_dir  # earlier stages (mlmtool.training.stages), oldest first
    info["stages"] = [checkpoints_info(mdir, stages / str(n) / "checkpoints") for n in numbers(stages)]
    info["pending_stage"] = str(stages / PENDING) if (stages / PENDING).exists() else None
    info["export"] = _file(mdir.weights_path)
    init = _file(mdir.init_weights_path)
    if init is not None:
        init["from"] = mdir.init_source()
    info["init_weights"] = init
    info["metrics"] = metrics_info(mdir)
    try:
        info["eval_results"] = _read_json(mdir.eval_results_path) if mdir.eval_results_path.exists() else None
    except Exception as e:
        info["eval_results"] = {"error": f"{e.__class__.__name__}: {e}"}
    tb = mdir.tensorboard_dir
    info["tensorboard"] = ({"path": str(tb), "event_files": len(list(tb.glob("events.out.tfevents.*")))}
                           if tb.is_dir() else None)
    info["manifest"] = {stage: rec.get("time") for stage, rec in mdir.read_manifest().items()
                        if isinstance(rec, dict)}
    lock = mdir.lock_path
    try:
        holder = _read_json(lock) if lock.exists() else None
        if isinstance(holder, dict):
            holder["alive"] = holder_alive(holder)
        info["lock"] = holder
    except Exception:
        info["lock"] = {"error": "unreadable"}
    info["next"] = next_step(info)
    return info
