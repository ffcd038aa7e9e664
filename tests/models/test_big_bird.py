"""BigBird: what is peculiar to it (the registry test, tests/test_families.py, covers the rest):
full attention only, block-sparse refused naming the field, even when only transformers'
default says it."""

from __future__ import annotations

import pytest

from mlmtool.errors import ConfigError
from mlmtool.models import families

TINY = families()["big_bird"].tiny_test_configs()["big_bird"]


@pytest.mark.parametrize("change,field", [
    ({"attention_type": "block_sparse"}, "attention_type='block_sparse'"),
    ({"attention_type": None}, "attention_type='block_sparse'"),  # left out: transformers' default
    ({"use_bias": False}, "use_bias=False"),
    ({"rescale_embeddings": True}, "rescale_embeddings=True"),
])
def test_what_the_network_does_not_implement_is_refused(change, field):
    config = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        families()["big_bird"].parse_config(config)
    assert field in str(e.value)


def test_full_attention_parses_to_berts_network():
    from mlmtool.models import bert_flax, load_model

    loaded = load_model(TINY)
    assert isinstance(loaded.module, bert_flax.MaskedLM) and loaded.config.variant.prefix == "bert"
    assert loaded.config.max_sequence_length == TINY["max_position_embeddings"]
