"""The ``README.md`` model card ``mlmtool export`` writes, from what DIR knows (jax-free).

A metadata header the Hugging Face hub reads (``library_name``, ``pipeline_tag``,
``license``, ``language``, ``tags``, ``datasets``), then a body: the family and its sizes,
the parameter count, the tokenizer, the corpus (files, documents, tokens), the tokens seen,
the training command and recipe (``manifest.json``), the evaluation results, a fill-mask
example with the family's mask token, and how to load and fine-tune the model.  A fact DIR
does not hold is left out, never guessed.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

#: ``datasets``' local builders (``--dataset json --data-files ...``): not a hub dataset to name
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder"}
#: how each family's model is called in the card
_FAMILY_NAMES = {"roberta": "RoBERTa", "bert": "BERT", "xlm-roberta": "XLM-RoBERTa", "camembert": "CamemBERT",
                 "modernbert": "ModernBERT", "distilbert": "DistilBERT"}


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:", *(f"- {json.dumps(v, ensure_ascii=False)}" for v in values)] if values else []


def header(*, model_type: str, license: str | None, languages: list[str], datasets: list[str]) -> str:
    """The YAML block the hub reads (strings quoted as JSON, which is valid YAML)."""
    lines = ["---", "library_name: transformers", "pipeline_tag: fill-mask"]
    if license:
        lines.append(f"license: {json.dumps(license)}")
    lines += _yaml_list("language", languages)
    lines += _yaml_list("tags", ["fill-mask", "masked-language-modeling", model_type, "mlmtool"])
    lines += _yaml_list("datasets", datasets)
    return "\n".join([*lines, "---"]) + "\n"


def hub_datasets(manifest: dict) -> list[str]:
    """Hub datasets the tokenizer or the block store was made from (local files: none)."""
    out: list[str] = []
    for stage in ("tokenizer", "prepare"):
        name = ((manifest.get(stage) or {}).get("inputs") or {}).get("dataset")
        if isinstance(name, str) and name not in _LOCAL_BUILDERS and name not in out:
            out.append(name)
    return out


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows if v is not None]
    return out


def _count(n) -> str | None:
    return f"{n:,}" if isinstance(n, int) else None


def _command(args: dict) -> str:
    """``mlmtool train DIR`` with the recorded options (those set: a false flag is omitted)."""
    parts = ["mlmtool", "train", "DIR"]
    for key, value in args.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _corpus(manifest: dict) -> list[str]:
    prepare = manifest.get("prepare") or {}
    inputs, outputs, args = prepare.get("inputs") or {}, prepare.get("outputs") or {}, prepare.get("args") or {}
    if not prepare:
        return []
    lines = ["## Training data", ""]
    if inputs.get("dataset"):
        what = " / ".join(str(inputs[k]) for k in ("dataset", "config", "split") if inputs.get(k))
        lines.append(f"The hub dataset `{what}` (column `{inputs.get('text_column', 'text')}`).")
    elif inputs.get("files"):
        files = inputs["files"]
        names = ", ".join(f"`{Path(f['path']).name}`" for f in files[:10])
        more = f" and {len(files) - 10} more" if len(files) > 10 else ""
        size = sum(int(f.get("size") or 0) for f in files)
        lines.append(f"{len(files)} file{'s' if len(files) != 1 else ''} ({size:,} bytes): {names}{more}.")
    docs, tokens, blocks = (outputs.get(k) or {} for k in ("documents", "tokens", "num_blocks"))
    lines += [""] + _table([
        ("documents (train / validation)", f"{_count(docs.get('train'))} / {_count(docs.get('validation'))}"
         if docs else None),
        ("tokens (train / validation)", f"{_count(tokens.get('train'))} / {_count(tokens.get('validation'))}"
         if tokens else None),
        ("blocks of `max_seq_length` tokens", f"{_count(blocks.get('train'))} / {_count(blocks.get('validation'))}"
         if blocks else None),
        ("max_seq_length", outputs.get("seq_len") or args.get("max_seq_length")),
        ("one document per block", "yes (`--line-by-line`)" if args.get("line_by_line") else None),
    ])
    return lines + [""]


def _training(manifest: dict, info: dict, summary: dict) -> list[str]:
    train = manifest.get("train") or {}
    if not train:
        return []
    args = train.get("args") or {}
    ck = info.get("checkpoints") or {}
    tokens_seen = summary.get("tokens_seen") or ck.get("tokens_seen")
    lines = ["## Training", ""]
    lines += _table([
        ("tokens seen", _count(tokens_seen)),
        ("steps", _count(summary.get("steps"))),
        ("stages", summary.get("stages") if (summary.get("stages") or 1) > 1 else None),
        ("global batch (sequences)", _count(ck.get("global_batch"))),
        ("optimizer", args.get("optimizer")),
        ("learning rate, schedule", f"{args.get('learning_rate')}, {args.get('lr_scheduler')}"
         if args.get("learning_rate") is not None else None),
        ("warm-up steps", args.get("warmup_steps") or None),
        ("weight decay", args.get("weight_decay")),
        ("masking", f"{args.get('masking', 'token')}, {args.get('mlm_probability')} of the tokens"
         if args.get("mlm_probability") is not None else None),
        ("compute dtype", args.get("dtype")),
        ("seed", args.get("seed")),
    ])
    lines += ["", "The command, with the options recorded in `manifest.json` (DIR is the model directory):", "",
              "```bash", _command(args), "```", ""]
    return lines


def _evaluation(info: dict) -> list[str]:
    results = info.get("eval_results")
    if isinstance(results, dict) and "eval_loss" in results:  # mlmtool eval
        lines = ["## Evaluation", "",
                 f"On the validation split ({_count(results.get('eval_samples'))} blocks, "
                 f"{_count(results.get('eval_tokens'))} predicted tokens; {results.get('masking', 'token')} "
                 f"masking {results.get('mlm_probability')}, {results.get('checkpoint')}):", ""]
    else:  # the last evaluation during training
        results = (info.get("metrics") or {}).get("last_eval")
        if not isinstance(results, dict) or not isinstance(results.get("eval_loss"), (int, float)):
            return []
        lines = ["## Evaluation", "", f"On the validation split, during training (step {results.get('step')}):", ""]
    lines += _table([("eval_loss", f"{results['eval_loss']:.4f}"),
                     ("eval_accuracy", f"{results.get('eval_accuracy', float('nan')):.4f}"),
                     ("perplexity", f"{results.get('perplexity', float('nan')):.2f}"),
                     ("unigram baseline accuracy", f"{results['eval_unigram_baseline_accuracy']:.4f}"
                      if "eval_unigram_baseline_accuracy" in results else None)])
    return lines + [""]


def _pooler_note(model_type: str, pooler: str | None) -> list[str]:
    if model_type != "bert":
        return []
    if pooler:
        return [f"The pooler (`bert.pooler.dense`) is the one of `{pooler}`, carried unchanged (masked-language "
                "modelling does not train it); `BertForSequenceClassification` starts from it.", ""]
    return ["This BERT has no pooler: it was pre-trained with the masked-language objective alone (no "
            "next-sentence prediction, which is what trains BERT's pooler), so `BertForSequenceClassification` "
            "initialises `bert.pooler.dense` at random, as it does the classifier, and fine-tuning trains both.",
            ""]


def model_card(*, info: dict, manifest: dict, summary: dict, mask_token: str, parameters: int,
               architecture: str, name: str, license: str | None, languages: list[str],
               pooler: str | None, checkpoint: str) -> str:
    """The whole README.md.  ``info``: ``mlmtool.info.directory_info``; ``summary``:
    ``mlmtool.report.summarize``; ``name``: the repository id or folder name the examples load;
    ``pooler``: where an imported pooler came from (BERT), None if there is none."""
    config = info.get("config") or {}
    tok = info.get("tokenizer") or {}
    model_type = config.get("model_type", "?")
    family = _FAMILY_NAMES.get(model_type, model_type)
    source = ((manifest.get("init") or {}).get("args") or {}).get("from")
    how = (f"continued from `{Path(source).name}` (`mlmtool init --from`)" if source
           else "pre-trained from scratch")
    lines = [header(model_type=model_type, license=license, languages=languages, datasets=hub_datasets(manifest)),
             f"# {name}", "",
             f"A {family} masked-language model (`{architecture}`), {how} with "
             "mlmtool in JAX/Flax and exported for transformers "
             f"({checkpoint}).", "", "## Model", ""]
    lines += _table([("model_type", f"`{model_type}`"), ("layers", config.get("layers")),
                     ("hidden size", config.get("hidden")), ("attention heads", config.get("heads")),
                     ("intermediate size", config.get("intermediate")),
                     ("positions", config.get("max_positions")), ("parameters", f"{parameters:,}")])
    lines += ["", "## Tokenizer", ""]
    lines += _table([("type", tok.get("type")), ("vocabulary", _count(tok.get("vocab_size"))),
                     ("lower-cased", "yes" if tok.get("lowercase") else "no" if tok else None),
                     ("special tokens", " ".join(f"`{t}`" for t in (tok.get("special_tokens") or {})) or None),
                     ("mask token", f"`{mask_token}`")])
    lines += [""]
    lines += _corpus(manifest)
    lines += _training(manifest, info, summary)
    lines += _evaluation(info)
    example = f"The capital of France is {mask_token}."
    lines += ["## How to use", "", "```python", "from transformers import pipeline", "",
              f"fill = pipeline(\"fill-mask\", model={json.dumps(name)})",
              f"fill({json.dumps(example)})", "```", "",
              "Load it for fine-tuning as any hub model: `AutoTokenizer.from_pretrained(...)` and "
              "`AutoModelForSequenceClassification` / `AutoModelForTokenClassification.from_pretrained(..., "
              "num_labels=N)` (the classification head is new and trained by fine-tuning).", ""]
    lines += _pooler_note(model_type, pooler)
    return "\n".join(lines).rstrip("\n") + "\n"
