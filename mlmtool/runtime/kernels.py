"""Which kernel computes attention, the Dense layers and dropout: chosen per backend, here only.

The model (``mlmtool.models.load_model``) asks :func:`select` once, when it is built, and computes the
same function whichever kernels it gets (tests/test_kernels.py checks the logits agree):

* ``attention``
  - ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, any backend and dtype;
  - ``"cudnn"``: cuDNN's fused flash attention through the same entry point
    (``implementation="cudnn"``).  NVIDIA GPUs only, bfloat16/float16 only, head_dim a
    multiple of 8 and at most 128.  The key padding mask goes in as per-row key lengths
    (cuDNN's PADDING mask), so rows must be padded on the right, as every mlmtool path
    pads them (the block store, ``eval``, ``predict``, HF's tokenizers by default).
    Document attention (``train --document-attention``: segment ids, documents packed in a
    row attend only to themselves) is NOT taken by cuDNN here: jax's
    ``jax.nn.dot_product_attention`` (0.10) takes no segment ids, and on its cuDNN path
    only per-row lengths (a dense ``mask`` becomes a [B, 1, L, L] bias).  cuDNN's packed
    layout (per-segment offsets and lengths) exists only in jax's private
    ``jax._src.cudnn.fused_attention_stablehlo``, untested here.  So with segment ids
    attention falls back to XLA with a dense [B, 1, L, L] mask, on every backend
    (``mlmtool.models.layers.attention``); unmeasured on a GPU so far.
* ``local_attention``: the sliding-window layers (ModernBERT's local layers: a query sees
  the keys at most ``local_attention // 2`` positions away, on both sides)
  - ``"blockwise"``: only the window's scores (``mlmtool.models.local_attention``: queries in
    blocks of the half-window, each attending to its span of ``block + 2 half`` keys),
    O(L * W) instead of O(L^2), in XLA, on every backend, with padding masks and segment
    ids alike; where it would not compute fewer scores (one block, or L short against the
    window) the dense form below;
  - ``"cudnn"``: cuDNN's fused kernel with ``local_window_size=(half, half)`` and per-row key
    lengths, taken only where cuDNN attention is and the installed jax accepts a two-sided
    window without a causal mask (:func:`cudnn_takes_two_sided_window`).  jax 0.10 does not:
    its cuDNN path takes a left window only ("cuDNN doesn't support right window"), so on
    GPUs the windowed layers are blockwise XLA; segment ids and dropout are always blockwise;
  - ``"dense"``: the [L, L] attention with the window as a mask (the form before blockwise;
    for A/B measurements).
  On TPU the intended fused path is the Pallas splash kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``) with a ``LocalMask((half, half))``
  and segment ids; it is not wired in (no TPU to test it on), so TPUs take blockwise.
  Training with attention-probability dropout (``attention_probs_dropout_prob > 0``, BERT's
  and RoBERTa's 0.1) spells attention out on every backend: neither entry point has dropout.
* ``dense``
  - ``"flat"``: one 2-D matmul over the flattened leading axes (XLA:CPU's weight gradient
    then needs no transposed copy: the CPU training step is ~13% faster,
    docs/benchmarks.md);
  - ``"nd"``: ``nn.Dense``'s N-D ``dot_general``, what the accelerators' compilers expect.
* ``dropout``
  - ``"fused-threefry"``: Threefry-2x32 unrolled so XLA fuses the bits, the comparison and
    the select into one pass (dropout falls from ~7% to ~1% of the CPU step);
  - ``"jax"``: ``jax.random.bits`` of the key's own implementation (``--prng-impl rbg``
    gives the hardware generator MaxText uses on accelerators).
  Both keep each element with probability 1 - rate and scale by 1 / (1 - rate).

Defaults: CPU keeps the CPU-tuned kernels; GPU and TPU take the library ones (``nd`` Dense,
``jax`` dropout) unless a measurement on that backend says otherwise (docs/benchmarks.md,
"Accelerators").  On TPU attention is XLA's: the Pallas splash kernel is not wired in.

``MLMTOOL_KERNELS`` overrides any choice for A/B measurements, e.g.
``MLMTOOL_KERNELS=attention=xla,dropout=fused-threefry``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from mlmtool.errors import ConfigError

Attention = Literal["xla", "cudnn"]
Dense = Literal["flat", "nd"]
Dropout = Literal["fused-threefry", "jax"]
LocalAttention = Literal["blockwise", "cudnn", "dense"]

CHOICES = {"attention": ("xla", "cudnn"), "dense": ("flat", "nd"), "dropout": ("fused-threefry", "jax"),
           "local_attention": ("blockwise", "cudnn", "dense")}
ENV = "MLMTOOL_KERNELS"

# Per-backend defaults, before the per-configuration checks of select().
DEFAULTS: dict[str, dict[str, str]] = {
    "cpu": {"attention": "xla", "dense": "flat", "dropout": "fused-threefry", "local_attention": "blockwise"},
    "gpu": {"attention": "cudnn", "dense": "nd", "dropout": "jax", "local_attention": "cudnn"},
    "tpu": {"attention": "xla", "dense": "nd", "dropout": "jax", "local_attention": "blockwise"},
}
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper with recent cuDNN; 128 holds on every supported GPU


@dataclasses.dataclass(frozen=True)
class Kernels:
    attention: Attention = "xla"
    dense: Dense = "flat"
    dropout: Dropout = "fused-threefry"
    local_attention: LocalAttention = "blockwise"
    note: str = dataclasses.field(default="", compare=False)  # why an override was not taken

    def describe(self) -> str:
        text = (f"attention {self.attention}, dense {self.dense}, dropout {self.dropout}, "
                f"local attention {self.local_attention}")
        return f"{text} ({self.note})" if self.note else text


def parse_overrides(text: str | None) -> dict[str, str]:
    """``"attention=xla,dense=nd"`` -> ``{"attention": "xla", "dense": "nd"}``, checked."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = (s.strip() for s in item.partition("="))
        if name not in CHOICES or value not in CHOICES[name]:
            raise ConfigError(f"{ENV}: {item.strip()!r} is not a kernel choice",
                              hint="use " + "; ".join(f"{k}={'|'.join(v)}" for k, v in CHOICES.items()))
        out[name] = value
    return out


def platform_of(backend: str) -> str:
    """jax's backend name ("cpu", "gpu", "cuda", "rocm", "tpu", ...) -> a DEFAULTS key."""
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    return backend if backend in DEFAULTS else "cpu"


def select(backend: str | None = None, *, dtype: str = "float32", head_dim: int = 64,
           gpu_vendor: str = "nvidia", overrides: str | None = None) -> Kernels:
    """The kernels for ``backend`` (default: jax's default backend) and this configuration.

    cuDNN attention is taken only where it runs: an NVIDIA GPU, a 16-bit dtype and a head
    size it supports; elsewhere attention falls back to XLA's.  ``overrides`` (default: the
    ``MLMTOOL_KERNELS`` environment variable) replaces the defaults but cannot force cuDNN
    where it cannot run.
    """
    if backend is None:
        import jax

        backend = jax.default_backend()
        if backend == "gpu":  # jax names CUDA and ROCm devices both "gpu"
            gpu_vendor = "nvidia" if "nvidia" in jax.devices()[0].device_kind.lower() else "other"
    if backend == "rocm":
        gpu_vendor = "other"
    platform = platform_of(backend)
    choice = dict(DEFAULTS[platform])
    asked = parse_overrides(os.environ.get(ENV) if overrides is None else overrides)
    choice.update(asked)
    cudnn_ok = (platform == "gpu" and gpu_vendor == "nvidia" and dtype in CUDNN_DTYPES
                and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)
    note = ""
    if choice["attention"] == "cudnn" and not cudnn_ok:
        choice["attention"] = "xla"
        if asked.get("attention") == "cudnn":  # asked for by name: say why it is not taken
            why = ("not an NVIDIA GPU" if platform != "gpu" or gpu_vendor != "nvidia" else
                   f"--dtype {dtype}, cuDNN needs bfloat16" if dtype not in CUDNN_DTYPES else
                   f"head size {head_dim}, cuDNN needs a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}")
            note = f"{ENV} attention=cudnn not taken: {why}"
    if choice["local_attention"] == "cudnn" and not (choice["attention"] == "cudnn"
                                                     and cudnn_takes_two_sided_window()):
        choice["local_attention"] = "blockwise"
    return Kernels(**choice, note=note)


_TWO_SIDED: list[bool] = []  # the probe's answer, once per process


def cudnn_takes_two_sided_window() -> bool:
    """Whether the installed jax's cuDNN attention accepts a two-sided sliding window
    (``local_window_size=(h, h)``) with per-row key lengths and no causal mask, asked of
    its own argument checks (``jax.eval_shape``: nothing runs, any backend).  jax 0.10
    refuses it ("cuDNN doesn't support right window"); an error of any other kind (no
    cuDNN on this machine) also counts as no."""
    if not _TWO_SIDED:
        import jax
        import jax.numpy as jnp

        x = jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.bfloat16)
        try:
            jax.eval_shape(lambda q: jax.nn.dot_product_attention(
                q, q, q, key_value_seq_lengths=jnp.full((1,), 64, jnp.int32), local_window_size=(8, 8),
                implementation="cudnn"), x)
            _TWO_SIDED.append(True)
        except Exception:  # noqa: BLE001 - refused, for whatever reason
            _TWO_SIDED.append(False)
    return _TWO_SIDED[0]
