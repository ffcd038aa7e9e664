"""config.json handling: presets, Hugging Face's defaults, ``--set`` overrides, validation.

The presets and defaults belong to the model families (``mlmtool.models``): the large
presets carry exactly the numbers of the published Hugging Face configs, so ``mlmtool init``
works without a hub; the small ones are for CPU work.  This module is family-agnostic and
jax-free.

``vocab_size`` in a preset is only the default for ``mlmtool tokenizer``: the trained
tokenizer's real size is written back into config.json.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path

from mlmtool import models
from mlmtool.errors import ConfigError
from mlmtool.models.base import is_int

DEFAULT_PRESET = "roberta-base"


# Fields transformers derives or renames (num_labels -> id2label, torch_dtype -> dtype): a
# config that sets them to anything but the default goes through transformers itself.
_DERIVED = ("id2label", "label2id", "dtype")
#: the dtype of every weight file mlmtool writes (model.safetensors, init.safetensors)
WEIGHTS_DTYPE = "float32"


def _full_dict(model_type: str, fields: dict) -> dict:
    """Every field of a config.json: HF's defaults for the fields ``fields`` does not set,
    with the family's ``architectures`` where it is null and the weights' ``dtype`` (as
    ``save_pretrained`` writes them; ``transformers_version`` is added when written,
    ``ModelDir.write_config``)."""
    family = models.family_for(model_type)
    full = _hf_dict(model_type, fields)
    if not full.get("architectures"):
        full["architectures"] = [family.architecture(model_type)]
    full["dtype"] = WEIGHTS_DTYPE  # init --from converts a bfloat16 model's weights too
    return full


def _hf_dict(model_type: str, fields: dict) -> dict:
    family = models.family_for(model_type)
    defaults = {**dict.fromkeys(family.extra_config_keys), **family.hf_defaults[model_type]}
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "transformers_version", "_name_or_path")}
    if fields.get("dtype") == WEIGHTS_DTYPE:  # what mlmtool writes: no need for transformers to resolve it
        fields = {k: v for k, v in fields.items() if k != "dtype"}
    if all(k in defaults for k in fields) and all(fields.get(k, defaults[k]) == defaults[k] for k in _DERIVED):
        extra = {k: fields[k] for k in family.extra_config_keys if k in fields}  # only where given
        return copy.deepcopy({**family.hf_defaults[model_type], **fields, **extra})
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


def load_config_file(path: Path, *, check: bool = True) -> dict:
    """Read a config.json into a full dict; raise ConfigError if it is unusable (``check``:
    also if :func:`validate` refuses it; ``init`` validates after its ``--set``, which may fix it)."""
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
    if check:
        validate(config)
    return config


def hint_in_dir(hint: str | None, config_path: Path, recreate: str | None = None) -> str | None:
    """A config hint as it reads for a config.json already in a DIR, read by any command.

    The checks name the fix as ``init --set`` (where configs are made), but outside ``init``
    there is no ``--set``, and ``init DIR --set ... --force`` would rebuild config.json from
    the default preset (dropping an ``init --from`` DIR's weights): editing the file works."""
    if not hint:
        return hint
    path = str(config_path)
    if recreate:  # the hints of an unreadable config.json (load_config_file, _hf_dict)
        hint = hint.replace("recreate it with 'mlmtool init DIR --force'", recreate)
        hint = hint.replace("fix config.json,", f"fix {path},")
    hint = re.sub(r"\(--set (\w+(?:, \w+)+)\)", rf"in {path} (\1)", hint)  # check the sizes (--set a, b)
    hint = re.sub(r" \(--set [^)]*\)", f" in {path}", hint)  # set K to V (--set K=V)

    def fix(m: re.Match) -> str:
        key, value = m["key"] or m["qkey"], m["value"] or m["qvalue"]
        if value in ("N", "X"):
            return f'fix "{key}" in {path}'
        literal = value if re.fullmatch(r"-?[\d.]+(e-?\d+)?|true|false|null|\[.*\]", value) else json.dumps(value)
        return f'set "{key}" to {literal} in {path}'

    quoted, plain = r"'(?P<qkey>\w+)=(?P<qvalue>[^']*)'", r"(?P<key>\w+)=(?P<value>[^\s,)]+)"
    hint = re.sub(rf"(?:fix it with |e\.g\. )?--set (?:{quoted}|{plain})", fix, hint)
    hint = re.sub(r"(fix it )?with --set\b", lambda m: f"{m[1] or ''}in {path}", hint)
    hint = hint.replace(", or let 'mlmtool tokenizer' set it", "")  # tokenizer reads config.json first
    return hint


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
        # typed as the family's default (a --from-config file's wrong value is what --set fixes)
        default = _family_default(base, key, base[key])
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


def _family_default(base: dict, key: str, fallback):
    family = models.family_for(base.get("model_type"))
    value = family.hf_defaults.get(base.get("model_type"), {}).get(key)
    return fallback if value is None else value


def _closest(name: str, choices: list[str]) -> str | None:
    """difflib's closest match (ratio >= 0.6), the first listed on a tie: 'robert' is
    'roberta-base', the default, not the alphabetically last of the equally close presets."""
    scored = [(difflib.SequenceMatcher(None, name, c).ratio(), -i, c) for i, c in enumerate(choices)]
    best = max(scored, default=None)
    return best[2] if best and best[0] >= 0.6 else None


def build_config(preset: str | None = None, *, overrides: list[str] = (), from_config: Path | None = None) -> dict:
    """The full config.json dict for a preset (or a config file), with ``--set`` overrides."""
    if from_config is not None:
        base = load_config_file(from_config, check=False)  # validated below, after --set
    else:
        name = preset or DEFAULT_PRESET
        presets = models.all_presets()
        if name not in presets:
            close = _closest(name, list(presets))
            hint = f"did you mean {close!r}?" if close else f"choose one of: {', '.join(presets)}"
            raise ConfigError(f"unknown preset {name!r}", hint)
        base = _full_dict(presets[name]["model_type"], presets[name])
    fields = parse_overrides(list(overrides), base)
    if "model_type" in fields:
        raise ConfigError("--set model_type is not supported", "choose a preset of that model type instead")
    fields = models.family_for(base["model_type"]).derived_overrides(base, fields)
    config = _full_dict(base["model_type"], {**base, **fields})
    validate(config)
    return config


#: Sizes beyond these are mistakes (a typo's extra zeros), not models; the block store
#: holds token ids as uint32.
MAX_LAYERS = 1024
MAX_PARAMETERS = 10**12
MAX_VOCAB_SIZE = 1 << 32


def validate(config: dict) -> None:
    """Consistency checks that would otherwise fail deep inside the model (or, for absurd
    sizes, never finish): the family checks every field its network reads; here, what every
    family shares (token ids, the vocabulary, the size limits)."""
    family = models.family_for(config.get("model_type"))
    vocab = config.get("vocab_size")
    if not is_int(vocab) or vocab <= 0:
        raise ConfigError(f"config vocab_size must be a positive integer, got {vocab!r}",
                          "fix it with --set vocab_size=N")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = config.get(key)
        if value is not None and (not is_int(value) or not 0 <= value < vocab):
            raise ConfigError(f"config {key} must be a token id in [0, {vocab}), got {value!r}",
                              "fix it with --set, or let 'mlmtool tokenizer' set it")
    if vocab > MAX_VOCAB_SIZE:
        raise ConfigError(f"config vocab_size {vocab:,} is beyond the {MAX_VOCAB_SIZE:,} token "
                          "ids the block store holds", "fix it with --set vocab_size=N")
    family.validate(config)
    layers = family.parse_config(config).num_layers
    if layers > MAX_LAYERS:
        key = family.layers_key
        raise ConfigError(f"config {key} {layers:,} is beyond mlmtool's limit of {MAX_LAYERS}",
                          f"fix it with --set {key}=N (BERT-large has 24)")
    n = family.parameter_count(config)
    if n > MAX_PARAMETERS:
        raise ConfigError(f"the config makes a model of {n:,} parameters, beyond mlmtool's limit of "
                          f"{MAX_PARAMETERS:,}", "check the sizes (--set hidden_size, intermediate_size, "
                          "num_hidden_layers, vocab_size, max_position_embeddings)")


def summary(config: dict) -> dict:
    """The numbers `init` and `info` print."""
    return models.family_for(config["model_type"]).summary(config)


def parameter_count(config: dict) -> int:
    """Parameters of the MLM model (tied decoder counted once), by the family's arithmetic."""
    return models.family_for(config["model_type"]).parameter_count(config)


def max_sequence_length(config: dict) -> int:
    """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 rows)."""
    return models.family_for(config["model_type"]).max_sequence_length(config)


def preset_table() -> dict[str, list[dict]]:
    """Family name -> one row per preset (registry order): name, aliases, layers, hidden,
    heads, parameters, positions and the preset's help line, for ``init --list-presets``;
    computed from the registry, so a new family's presets appear by themselves."""
    out: dict[str, list[dict]] = {}
    for family in models.families().values():
        aliases: dict[str, list[str]] = {}
        for alias, name in family.preset_aliases.items():
            aliases.setdefault(name, []).append(alias)
        rows = []
        for name in family.presets:
            config = build_config(name)
            facts = family.summary(config)
            rows.append({"preset": name, "aliases": aliases.get(name, []), "model_type": config["model_type"],
                         "layers": facts["layers"], "hidden": facts["hidden"], "heads": facts["heads"],
                         "parameters": family.parameter_count(config), "positions": facts["max_positions"],
                         "vocab": facts["vocab"], "help": family.preset_help.get(name, "")})
        out[family.name] = rows
    return out
