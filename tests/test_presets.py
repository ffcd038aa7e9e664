"""Presets and config.json: the same dicts as transformers builds, without importing it."""

from __future__ import annotations

import json

import pytest

from mlmtool import presets
from mlmtool.models import all_presets, families
from mlmtool.presets import build_config, load_config_file
from tests.pipeline import heavy_imports

transformers = pytest.importorskip("transformers")


def _hf_dict(model_type: str, fields: dict, *, saved: bool = True) -> dict:
    """transformers' config dict; ``saved``: as ``save_pretrained`` of a float32 model of
    the family's architecture writes it (``architectures``, ``dtype``), as mlmtool does."""
    kwargs = {k: v for k, v in fields.items() if k != "model_type"}
    d = transformers.AutoConfig.for_model(model_type, **kwargs).to_dict()
    d.pop("transformers_version", None)
    d.pop("_name_or_path", None)
    if saved:
        from mlmtool.models import family_for

        d["architectures"] = d.get("architectures") or [family_for(model_type).architecture(model_type)]
        d["dtype"] = "float32"
    return json.loads(json.dumps(d))  # as config.json stores it


PRESETS = all_presets()
HF_DEFAULTS = {t: d for f in families().values() for t, d in f.hf_defaults.items()}


@pytest.mark.parametrize("model_type", sorted(HF_DEFAULTS))
def test_defaults_are_transformers_defaults(model_type):
    assert HF_DEFAULTS[model_type] == _hf_dict(model_type, {}, saved=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_transformers(name):
    assert build_config(name) == _hf_dict(PRESETS[name]["model_type"], PRESETS[name])


def test_overrides_match_transformers():
    sets = ["num_hidden_layers=3", "hidden_dropout_prob=0.2", "vocab_size=1000", "hidden_act=gelu_new"]
    want = _hf_dict("roberta", {**PRESETS["tiny"], "num_hidden_layers": 3, "hidden_dropout_prob": 0.2,
                                "vocab_size": 1000, "hidden_act": "gelu_new"})
    assert build_config("tiny", overrides=sets) == want


def test_config_files_with_unknown_or_derived_fields_go_through_transformers(tmp_path):
    for extra in ({"position_embedding_type": "absolute", "gradient_checkpointing": False},
                  {"num_labels": 3}, {"torch_dtype": "float32"}):
        path = tmp_path / "config.json"
        raw = {**PRESETS["bert-tiny"], **extra}
        path.write_text(json.dumps(raw))
        assert load_config_file(path) == _hf_dict("bert", raw), extra
    assert len(load_config_file(path)["id2label"]) == 2  # torch_dtype: defaults kept
    path.write_text(json.dumps({**PRESETS["bert-tiny"], "num_labels": 3}))
    assert len(load_config_file(path)["id2label"]) == 3


def test_our_config_json_reloads_unchanged(tmp_path):
    config = build_config("small")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert load_config_file(path) == config


@pytest.mark.slow
def test_init_imports_neither_transformers_nor_jax(tmp_path):
    """... and config.json records the architecture, dtype and transformers version as
    save_pretrained does."""
    assert heavy_imports("init", tmp_path / "m", "--preset", "small") == []
    from mlmtool.modeldir import with_transformers_version

    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written == with_transformers_version(presets.build_config("small"))
    assert written["transformers_version"] == transformers.__version__ and written["dtype"] == "float32"


@pytest.mark.parametrize("model_type", sorted(HF_DEFAULTS))
def test_every_config_names_its_architecture(tmp_path, model_type):
    """A preset, a config file without architectures (CamemBERT has no preset: 'init
    --from-config' is how one is made) and a config without dtype: config.json names the
    family's *ForMaskedLM class and float32, as save_pretrained writes them."""
    from mlmtool.models import family_for

    want = [family_for(model_type).architecture(model_type)]
    named = [n for n, p in PRESETS.items() if p["model_type"] == model_type]
    if named:  # a preset's own architectures (ELECTRA's pair is ElectraForPreTraining), else the family's
        assert build_config(named[0])["architectures"] == (PRESETS[named[0]].get("architectures") or want)
    tiny = next(f for f in families().values() if model_type in f.model_types).tiny_test_configs()[model_type]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny, "architectures": None}))
    config = build_config(from_config=path)
    assert config["architectures"] == want and config["dtype"] == "float32"
    path.write_text(json.dumps({k: v for k, v in tiny.items() if k != "architectures"}))
    assert build_config(from_config=path)["architectures"] == want


@pytest.mark.slow
def test_list_presets_is_a_table_of_the_registry():
    """``init --list-presets`` (no DIR needed): every family's presets, from the registry, with
    their layers, hidden, heads, parameters and positions; jax and transformers stay unloaded."""
    from mlmtool.presets import preset_table
    from tests.pipeline import invoke

    table = preset_table()
    assert list(table) == [f.name for f in families().values()]
    for family in families().values():
        rows = {r["preset"]: r for r in table[family.name]}
        assert list(rows) == list(family.presets)
        for name, row in rows.items():
            config = build_config(name)
            assert row["parameters"] == presets.parameter_count(config)
            facts = family.summary(config)
            assert (row["layers"], row["hidden"], row["positions"]) == (
                facts["layers"], facts["hidden"], facts["max_positions"])
    r = invoke("init", "--list-presets")
    assert r.exit_code == 0, r.output
    for family in families().values():
        assert f"{family.name} family" in r.output
        assert all(name in r.output for name in family.presets)
    assert "124.7M" in r.output  # roberta-base
    assert heavy_imports("init", "--list-presets") == []
