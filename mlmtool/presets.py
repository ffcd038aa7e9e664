"""Offline model presets and config.json handling.

The large presets carry exactly the numbers of the published Hugging Face configs
(``roberta-base``, ``roberta-large``, ``bert-base-uncased``, ``bert-large-uncased``), so
``mlmtool init`` works without a hub.  The small ones are for CPU work: ``small`` is the
4-layer, 256-wide model used as the reference in the benchmarks, ``tiny`` trains a
useful model on a few MB of text in minutes on two CPU cores.

``vocab_size`` in a preset is only the default for ``mlmtool tokenizer``: the trained
tokenizer's real size is written back into config.json.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

from mlmtool.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("roberta", "bert")

_ROBERTA = dict(
    model_type="roberta",
    architectures=["RobertaForMaskedLM"],
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=514,  # 512 tokens + padding_idx offset of 2 (RoBERTa positions start at pad+1)
    type_vocab_size=1,
    initializer_range=0.02,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
)

_BERT = dict(
    model_type="bert",
    architectures=["BertForMaskedLM"],
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)

_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
# hidden 256 x 4 layers x 4 heads, intermediate 1024, vocab 8192: the benchmarks' reference model.
_SMALL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
# Small enough that `make demo` trains it in minutes on 2 CPU cores.
_TINY = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)

PRESETS: dict[str, dict] = {
    "roberta-base": _ROBERTA,
    "roberta-large": {**_ROBERTA, **_LARGE},
    "bert-base": _BERT,
    "bert-large": {**_BERT, **_LARGE},
    "small": {**_ROBERTA, **_SMALL},
    "tiny": {**_ROBERTA, **_TINY},
    "bert-small": {**_BERT, **_SMALL},
    "bert-tiny": {**_BERT, **_TINY},
}
DEFAULT_PRESET = "roberta-base"

PRESET_HELP = {
    "roberta-base": "RoBERTa base, 125M params (HF roberta-base)",
    "roberta-large": "RoBERTa large, 355M params (HF roberta-large)",
    "bert-base": "BERT base uncased, 110M params (HF bert-base-uncased)",
    "bert-large": "BERT large uncased, 335M params (HF bert-large-uncased)",
    "small": "RoBERTa-style, 4 x 256, for CPU work",
    "tiny": "RoBERTa-style, 2 x 128, for demos and tests",
    "bert-small": "BERT-style, 4 x 256",
    "bert-tiny": "BERT-style, 2 x 128",
}


_COMMON_DEFAULTS = dict(
    add_cross_attention=False, architectures=None, attention_probs_dropout_prob=0.1, chunk_size_feed_forward=0,
    classifier_dropout=None, dtype=None, hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=768,
    id2label={"0": "LABEL_0", "1": "LABEL_1"}, initializer_range=0.02, intermediate_size=3072, is_decoder=False,
    is_encoder_decoder=False, label2id={"LABEL_0": 0, "LABEL_1": 1}, layer_norm_eps=1e-12,
    max_position_embeddings=512, num_attention_heads=12, num_hidden_layers=12, output_attentions=False,
    output_hidden_states=False, problem_type=None, return_dict=True, tie_word_embeddings=True, type_vocab_size=2,
    use_cache=True,
)
#: ``AutoConfig.for_model(model_type).to_dict()`` of transformers 5, as config.json stores
#: it (without transformers_version): every field a config.json of that type has.  Written
#: out so that ``init`` needs neither transformers nor the torch it imports (seconds);
#: tests/test_presets.py checks it against the installed transformers.
HF_DEFAULTS: dict[str, dict] = {
    "roberta": {**_COMMON_DEFAULTS, "model_type": "roberta", "vocab_size": 50265, "bos_token_id": 0,
                "pad_token_id": 1, "eos_token_id": 2},
    "bert": {**_COMMON_DEFAULTS, "model_type": "bert", "vocab_size": 30522, "bos_token_id": None,
             "pad_token_id": 0, "eos_token_id": None},
}
# Fields transformers derives or renames (num_labels -> id2label, torch_dtype -> dtype): a
# config that sets them to anything but the default goes through transformers itself.
_DERIVED = ("id2label", "label2id", "dtype")


def _full_dict(model_type: str, fields: dict) -> dict:
    """Every field of a config.json: HF's defaults for the fields ``fields`` does not set."""
    import copy

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}",
                          f"use one of: {', '.join(SUPPORTED_MODEL_TYPES)}")
    defaults = HF_DEFAULTS[model_type]
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "transformers_version", "_name_or_path")}
    if all(k in defaults for k in fields) and all(fields.get(k, defaults[k]) == defaults[k] for k in _DERIVED):
        return copy.deepcopy({**defaults, **fields})
    from transformers import AutoConfig  # unknown or derived fields: let transformers resolve them

    try:
        d = AutoConfig.for_model(model_type, **fields).to_dict()
    except Exception as e:  # transformers' own type checks (e.g. a string where a number belongs)
        text = " ".join(str(e).split()) or e.__class__.__name__
        raise ConfigError(f"the config is not valid for transformers ({text[:300]})",
                          "fix config.json, or recreate it with 'mlmtool init DIR --force'") from None
    d.pop("transformers_version", None)
    d.pop("_name_or_path", None)
    return json.loads(json.dumps(d))  # as config.json holds it (id2label's keys are strings)


def load_config_file(path: Path) -> dict:
    """Read a config.json into a full dict; raise ConfigError if it is unusable."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", "check the path") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e.__class__.__name__})",
                          "restore it, or recreate it with 'mlmtool init DIR --force'") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"{path} has no model_type",
                          "recreate it with 'mlmtool init DIR --force'")
    config = _full_dict(raw["model_type"], raw)
    validate(config)
    return config


def parse_overrides(items: list[str], base: dict) -> dict:
    """Turn ``--set key=value`` items into typed values, checked against ``base``'s fields."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value", "write e.g. --set num_hidden_layers=6")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see config.json for the known keys"
            raise ConfigError(f"--set: unknown config key {key!r}", hint)
        default = base[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            elif default is None or isinstance(default, (list, dict)):
                literal = value[:1] in "[{0123456789-" or value in ("null", "true", "false")
                out[key] = json.loads(value) if literal else value
            else:
                out[key] = value
        except ValueError:
            raise ConfigError(f"--set {key}={value!r}: expected {type(default).__name__}",
                              f"e.g. --set {key}={default!r}") from None
    return out


def build_config(preset: str | None = None, *, overrides: list[str] = (), from_config: Path | None = None) -> dict:
    """The full config.json dict for a preset (or a config file), with ``--set`` overrides."""
    if from_config is not None:
        base = load_config_file(from_config)
    else:
        name = preset or DEFAULT_PRESET
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(PRESETS)}"
            raise ConfigError(f"unknown preset {name!r}", hint)
        base = _full_dict(PRESETS[name]["model_type"], PRESETS[name])
    fields = parse_overrides(list(overrides), base)
    if "model_type" in fields:
        raise ConfigError("--set model_type is not supported", "choose a preset of that model type instead")
    config = _full_dict(base["model_type"], {**base, **fields})
    validate(config)
    return config


#: Sizes beyond these are mistakes (a typo's extra zeros), not models: the layers are unrolled
#: at compilation, and the block store holds token ids as uint32.
MAX_LAYERS = 1024
MAX_PARAMETERS = 10**12
MAX_VOCAB_SIZE = 1 << 32
_FLOAT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(config: dict) -> None:
    """Consistency checks that would otherwise fail deep inside the model (or, for absurd
    sizes, never finish): every field the model reads has the right JSON type and range."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings"):
        value = config.get(key)
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"config {key} must be a positive integer, got {value!r}",
                              f"fix it with --set {key}=N")
    for key in ("type_vocab_size",):
        value = config.get(key, 1)
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"config {key} must be a positive integer, got {value!r}",
                              f"fix it with --set {key}=N")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = config.get(key)
        if value is not None and (not _is_int(value) or not 0 <= value < config["vocab_size"]):
            raise ConfigError(f"config {key} must be a token id in [0, {config['vocab_size']}), got {value!r}",
                              "fix it with --set, or let 'mlmtool tokenizer' set it")
    for key in _FLOAT_FIELDS:
        if key in config and not _is_number(config[key]):
            raise ConfigError(f"config {key} must be a number, got {config[key]!r}",
                              f"fix it with --set {key}=X")
    for key in ("layer_norm_eps", "initializer_range"):
        if key in config and not config[key] > 0:
            raise ConfigError(f"config {key} must be positive, got {config[key]!r}", f"fix it with --set {key}=X")
    if not isinstance(config.get("hidden_act", "gelu"), str):
        raise ConfigError(f"config hidden_act must be a string, got {config.get('hidden_act')!r}",
                          "fix it with --set hidden_act=gelu")
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise ConfigError(f"config num_hidden_layers {config['num_hidden_layers']:,} is beyond mlmtool's "
                          f"limit of {MAX_LAYERS}", "fix it with --set num_hidden_layers=N (BERT-large has 24)")
    if config["vocab_size"] > MAX_VOCAB_SIZE:
        raise ConfigError(f"config vocab_size {config['vocab_size']:,} is beyond the {MAX_VOCAB_SIZE:,} token "
                          "ids the block store holds", "fix it with --set vocab_size=N")
    from mlmtool.info import parameter_count

    n = parameter_count(config)
    if n > MAX_PARAMETERS:
        raise ConfigError(f"the config makes a model of {n:,} parameters, beyond mlmtool's limit of "
                          f"{MAX_PARAMETERS:,}", "check the sizes (--set hidden_size, intermediate_size, "
                          "num_hidden_layers, vocab_size, max_position_embeddings)")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ConfigError(
            f"hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
            f"{config['num_attention_heads']}", "change one of them with --set")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if not 0.0 <= config.get(key, 0.0) < 1.0:
            raise ConfigError(f"config {key} must be in [0, 1)", f"fix it with --set {key}=0.1")


def summary(config: dict) -> dict:
    """The numbers `init` and `info` print."""
    return {
        "model_type": config["model_type"],
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "heads": config["num_attention_heads"],
        "intermediate": config["intermediate_size"],
        "vocab": config["vocab_size"],
        "max_positions": config["max_position_embeddings"],
    }


def max_sequence_length(config: dict) -> int:
    """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 rows)."""
    offset = config["pad_token_id"] + 1 if config["model_type"] == "roberta" else 0
    return config["max_position_embeddings"] - offset
