"""Training FLOPs of the MLM step and the devices' peaks: model-FLOPs utilisation (MFU).

MFU as PaLM defines it (Chowdhery et al. 2022, arXiv:2204.02311, appendix B): the FLOPs the
model needs per token, times tokens per second, over the device's peak.  A training step is
forward + backward = 3 x forward (nanoGPT's ``estimate_mfu``); a multiply-add is 2 FLOPs:

* per token, every weight matrix: ``6 N`` (``N`` the parameters in matmuls and norms, the
  position/token-type tables excluded: they are looked up, not multiplied);
* per token, attention scores and context: ``12 layers hidden seq_len``.

Two counts, because our step runs the MLM head (dense + decoder, about 30% of a base
model's matmul weights) only at the prediction slots (MosaicBERT, arXiv:2312.17482):

* ``model``: the head on every position, as Hugging Face computes it;
* ``executed``: the head on the step's prediction slots (``head_fraction`` of positions),
  what our step computes: the honest numerator for our MFU.
"""

from __future__ import annotations

# Dense bf16 peak FLOP/s of one chip (vendor datasheets, without sparsity).  First match of
# the substring in jax's ``device_kind`` wins, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM: the H100's arithmetic with more memory
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The chip's dense bf16/fp16 peak, or None when unknown or for float32 (whose peak
    depends on TF32 settings): MFU is quoted against a known 16-bit peak only."""
    if dtype not in ("bfloat16", "float16"):
        return None
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name.lower() in kind), None)


def matmul_parameters(config: dict) -> tuple[int, int]:
    """(encoder, MLM head) parameters that take part in per-token arithmetic (the family's count)."""
    from mlmtool import models

    family = models.family_for(config["model_type"])
    return family.matmul_parameters(family.parse_config(config))


def training_flops_per_token(config: dict, seq_len: int, head_fraction: float = 1.0) -> dict[str, float]:
    """``model`` and ``executed`` training FLOPs per token (see the module docstring);
    ``head_fraction`` is the share of positions the MLM head runs on."""
    from mlmtool import models

    family = models.family_for(config["model_type"])
    parsed = family.parse_config(config)
    encoder, head = family.matmul_parameters(parsed)
    attention = 12 * parsed.num_layers * parsed.hidden_size * seq_len
    return {"model": float(6 * (encoder + head) + attention),
            "executed": float(6 * encoder + attention + 6 * head * head_fraction)}
