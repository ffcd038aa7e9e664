"""``mlmtool info DIR``: what the model directory holds, stage by stage."""

from __future__ import annotations

from mlmtool.cli import app
from mlmtool.cli.options import JsonOpt, ModelDirArg, emit


@app.command("info")
def info_command(model_dir: ModelDirArg, json_out: JsonOpt = False) -> None:
    """Show what DIR holds: config, tokenizer, data, checkpoints, export, metrics.

    Config summary and parameter count, tokenizer type, vocabulary and special tokens,
    prepared blocks, checkpoint steps, export, last metrics and eval results, and the next
    command to run.  Works at any stage; --json for scripts.
    """
    from mlmtool.info import directory_info
    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.progress import console

    info = directory_info(ModelDir(model_dir))
    if json_out:
        emit(info)
        return
    console.print(_table(info))


def _checkpoints_line(ck: dict) -> str:
    """Checkpoint steps, size, tokens seen, and where the stage started (mlmtool.training.stages)."""
    from mlmtool.runtime.progress import human_bytes

    total = f" of {ck['total_steps']:,}" if ck.get("total_steps") else ""
    line = (f"steps {', '.join(f'{s:,}' for s in ck['steps'])} (latest {ck['latest']:,}{total}), "
            f"{human_bytes(ck['bytes'])}")
    if ck.get("tokens_seen"):
        line += f", {ck['tokens_seen']:,} tokens seen"
    src = ck.get("started_from")
    if src:
        line += f"; started from step {src['step']:,} of {src['checkpoint'].rsplit('/', 2)[0]}"
    return line


def _table(info: dict):
    from rich.table import Table

    from mlmtool.runtime.progress import human_bytes

    t = Table(title=info["path"], title_justify="left", show_header=False, show_edge=False)
    t.add_column(style="bold")
    t.add_column()
    none = "[dim]—[/]"

    def err(part):
        return f"[red]{part['error']}[/]" if isinstance(part, dict) and "error" in part else None

    c = info["config"]
    t.add_row("config", none if c is None else err(c) or (
        f"{c['model_type']} ({c['family']} family): {c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, "
        f"intermediate {c['intermediate']}, vocab {c['vocab']:,}, sequences up to {c['max_sequence_length']}; "
        f"{c['parameters']:,} parameters ({c['parameters'] / 1e6:.{1 if c['parameters'] >= 1e6 else 3}f}M)"))
    tk = info["tokenizer"]
    if tk is None or err(tk):
        t.add_row("tokenizer", none if tk is None else err(tk))
    else:
        specials = " ".join(f"{k}={v}" for k, v in tk["special_tokens"].items())
        t.add_row("tokenizer", f"{tk['type']}{', lowercased' if tk['lowercase'] else ''}, vocab "
                               f"{tk['vocab_size']:,}; special tokens {specials}")
    stores = {"data": info["data"], **{f"data {n}": d for n, d in (info.get("data_stores") or {}).items()}}
    for label, d in stores.items():  # DIR/data, then the stores of 'prepare --name'
        if d is None or err(d):
            t.add_row(label, none if d is None else err(d))
            continue
        blocks, tokens = d.get("blocks") or {}, d.get("tokens") or {}
        parts = [f"{split} {blocks.get(split, 0):,} blocks / {tokens.get(split, 0):,} tokens"
                 for split in ("train", "validation")]
        t.add_row(label, f"{', '.join(parts)}; seq len {d['seq_len']}"
                         f"{' (line by line)' if d.get('line_by_line') else ''}, "
                         f"{d.get('validation_split_percentage')}% validation, {human_bytes(d['bytes'])}"
                         + (f", {d['num_shards']} shards" if (d.get("num_shards") or 1) > 1 else "")
                         + (f"; fingerprint {d['fingerprint']['train'][:12]}/{d['fingerprint']['validation'][:12]}"
                            if d.get("fingerprint") else ""))
    init = info.get("init_weights")
    if init is not None:
        t.add_row("init weights", f"{init['path']} (from {init.get('from') or '?'}), {human_bytes(init['bytes'])}")
    for n, st in enumerate(info.get("stages") or [], start=1):
        if st is not None:
            t.add_row(f"stage {n}", _checkpoints_line(st))
    ck = info["checkpoints"]
    t.add_row("checkpoints" if not info.get("stages") else f"stage {len(info['stages']) + 1}",
              none if ck is None else _checkpoints_line(ck))
    ex = info["export"]
    t.add_row("export", none if ex is None else f"{ex['path']}, {human_bytes(ex['bytes'])}, {ex['modified']}")
    m = info["metrics"]
    if m and "last_train" in m:
        lt = m["last_train"]
        t.add_row("last train", f"step {lt['step']:,}: loss {lt['loss']:.4f}, accuracy {lt.get('accuracy', 0):.4f}, "
                                f"lr {lt.get('learning_rate', 0):.2e}"
                                + (f", {lt['tokens_seen']:,} tokens seen" if lt.get("tokens_seen") else ""))
    if m and "last_eval" in m:
        le = m["last_eval"]
        t.add_row("last eval", f"step {le['step']:,}: loss {le['eval_loss']:.4f}, accuracy "
                               f"{le['eval_accuracy']:.4f}, perplexity {le['perplexity']:.2f}")
    ev = info["eval_results"]
    if ev is not None:
        t.add_row("eval results", err(ev) or f"loss {ev.get('eval_loss', float('nan')):.4f}, accuracy "
                                              f"{ev.get('eval_accuracy', float('nan')):.4f}, perplexity "
                                              f"{ev.get('perplexity', float('nan')):.2f} ({ev.get('checkpoint', '?')})")
    if info.get("tensorboard"):
        t.add_row("tensorboard", f"{info['tensorboard']['path']} ({info['tensorboard']['event_files']} event files)")
    lock = info.get("lock")
    if lock:
        state = "in use" if lock.get("alive") else "stale lock"
        t.add_row("lock", f"{state}: 'mlmtool {lock.get('command', '?')}' PID {lock.get('pid')} on {lock.get('host')}")
    t.add_row("next", info["next"])
    return t
