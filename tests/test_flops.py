"""FLOPs per token and the devices' peaks behind the MFU that train logs and the benchmarks print."""

from __future__ import annotations

import pytest

from mlmtool.training.flops import matmul_parameters, peak_flops, training_flops_per_token
from mlmtool.models import family_for
from mlmtool.presets import build_config


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "float16", 756e12), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("NVIDIA H200", "float32", None), ("cpu", "bfloat16", None), ("Some Accelerator", "bfloat16", None),
])
def test_peak_flops(kind, dtype, peak):
    assert peak_flops(kind, dtype) == peak


@pytest.mark.parametrize("preset", ["roberta-base", "bert-base", "tiny"])
def test_flop_parameters_are_the_model_without_its_lookup_tables(preset):
    config = build_config(preset)
    encoder, head = matmul_parameters(config)
    lookups = (config["max_position_embeddings"] + config["type_vocab_size"]) * config["hidden_size"]
    assert encoder + head == family_for(config["model_type"]).parameter_count(config) - lookups


def test_flops_per_token():
    config = build_config("roberta-base")
    encoder, head = matmul_parameters(config)
    full = training_flops_per_token(config, 128)
    assert full["model"] == full["executed"] == 6 * (encoder + head) + 12 * 12 * 768 * 128
    part = training_flops_per_token(config, 128, head_fraction=0.2)
    assert part["model"] == full["model"]
    assert part["executed"] == pytest.approx(full["model"] - 6 * head * 0.8)
