"""Training objectives: what the step and eval compute from a masked batch, chosen from the
model's config (``objective_for``).  The step (``mlmtool.training.step``) owns the masking, the
gradient accumulation and the optimizer; eval (``mlmtool.training.evaluate``) the deterministic row
keys and the sums over the split; an objective owns the forward passes and the summed
metrics between, and how the trained parameters are exported.

* ``mlm``: the masked-language-model loss (cross-entropy at the masked positions).
* ``replaced-token-detection``: ELECTRA (Clark et al. 2020, arXiv:2003.10555).  The
  generator (a small MLM) predicts the masked tokens; each masked position is then replaced
  by a token sampled from the generator's softmax (``jax.random.categorical``, Gumbel-max, on
  the device, from the step's key; no gradient flows through the sample); the
  discriminator labels every real token of the result original or replaced (a token the
  generator sampled right counts as original, as in the paper).  Loss = MLM(generator) +
  50 x binary cross-entropy(discriminator), each a mean over the global batch: the MLM over
  the masked positions, the replaced-token detection over the non-padding tokens.

Sums, not means, leave an objective: ``loss_sum``/``accuracy_sum`` (over ``denominator``
masked positions) are the generator's MLM for both, so the divergence checks, the log line
and eval's loss/accuracy/perplexity read the same for every model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mlmtool.errors import ConfigError


def mlm_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and summed correct predictions over weighted positions."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)  # [B, P]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)  # [B, P]
    return jnp.sum(xent * weights), jnp.sum(correct * weights)


class MaskedLM:
    """The masked-language-model loss."""

    name = "mlm"
    sum_keys = ("loss_sum", "accuracy_sum")

    def denominators(self, masked, input_ids, pad_token_id: int) -> dict:
        """Counts over the whole (accumulated, global) batch that the losses are divided by."""
        return {"denominator": jnp.sum(masked.masked_weights)}

    def loss(self, model, params, micro, ids, key, *, attention_mask, documents: dict,
             denominators: dict) -> tuple[jax.Array, dict]:
        """(loss for the gradient, sums) of one micro-batch: ``micro`` its MaskedBatch, ``ids``
        [B, L] the uncorrupted rows, ``key`` its dropout key."""
        logits = model.apply({"params": params}, micro.input_ids, attention_mask=attention_mask,
                             deterministic=False, masked_positions=micro.masked_positions,
                             rngs={"dropout": key}, **documents)  # [B, P, V]
        loss_sum, correct_sum = mlm_sums(logits, micro.masked_labels, micro.masked_weights)
        return loss_sum / jnp.maximum(denominators["denominator"], 1.0), \
            {"loss_sum": loss_sum, "accuracy_sum": correct_sum}

    def eval_sums(self, model, params, masked, ids, row_keys, *, attention_mask, documents: dict) -> dict:
        logits = model.apply({"params": params}, masked.input_ids, attention_mask=attention_mask,
                             deterministic=True, masked_positions=masked.masked_positions, **documents)  # [B, P, V]
        loss_sum, correct_sum = mlm_sums(logits, masked.masked_labels, masked.masked_weights)
        return {"loss_sum": loss_sum, "accuracy_sum": correct_sum}

    def eval_results(self, totals: dict) -> dict:
        """eval's metrics beyond loss, accuracy and perplexity."""
        return {}

    def record(self, window: list[dict]) -> dict:
        """The training log's fields beyond the MLM ones, from a window of step metrics."""
        return {}

    def export(self, loaded, params, mdir) -> None:
        """Write the trained model where transformers loads it (DIR/model.safetensors), with
        the tensors the family carries untrained (BERT's imported pooler)."""
        loaded.save_hf(params, mdir.weights_path, carry_from=mdir.carried_weights)


def replace_masked(input_ids: jax.Array, positions: jax.Array, weights: jax.Array, tokens: jax.Array) -> jax.Array:
    """``input_ids`` [B, L] with ``tokens`` [G, P] written at the used slots of ``positions``
    [G, P] (``mlmtool.training.masking.MaskedBatch``: a group's positions index its rows end to end,
    all distinct); unused slots (weight 0) leave their position as it is."""
    groups = positions.shape[0]
    flat = input_ids.reshape(groups, -1)  # [G, R * L]
    current = jnp.take_along_axis(flat, positions, axis=1)  # [G, P]
    new = jnp.where(weights > 0, tokens.astype(flat.dtype), current)
    flat = flat.at[jnp.arange(groups)[:, None], positions].set(new)
    return flat.reshape(input_ids.shape)


class ReplacedTokenDetection(MaskedLM):
    """ELECTRA's generator + discriminator objective (module doc).  The model is the pair
    (``mlmtool.models.electra_flax.Electra``): ``__call__`` the generator, ``discriminate``
    the discriminator."""

    name = "replaced-token-detection"
    sum_keys = ("loss_sum", "accuracy_sum", "rtd_loss_sum", "rtd_accuracy_sum", "replaced_sum")

    def __init__(self, weight: float):
        self.weight = weight  # the paper's lambda

    def denominators(self, masked, input_ids, pad_token_id: int) -> dict:
        return {"denominator": jnp.sum(masked.masked_weights),
                "rtd_denominator": jnp.sum(input_ids != pad_token_id).astype(jnp.float32)}

    def _detect(self, model, params, replaced, ids, attention_mask, documents, **apply_kw) -> dict:
        logits = model.apply({"params": params}, replaced, attention_mask=attention_mask, method="discriminate",
                             **documents, **apply_kw)  # [B, L]
        label = (replaced != ids) & attention_mask  # [B, L]: the token was replaced
        w = attention_mask.astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(logits, label.astype(jnp.float32))
        return {"rtd_loss_sum": jnp.sum(bce * w), "rtd_accuracy_sum": jnp.sum(((logits > 0) == label) * w),
                "replaced_sum": jnp.sum(label.astype(jnp.float32))}

    def loss(self, model, params, micro, ids, key, *, attention_mask, documents: dict,
             denominators: dict) -> tuple[jax.Array, dict]:
        gen_key, sample_key, disc_key = jax.random.split(key, 3)
        logits = model.apply({"params": params}, micro.input_ids, attention_mask=attention_mask,
                             deterministic=False, masked_positions=micro.masked_positions,
                             rngs={"dropout": gen_key}, **documents)  # [G, P, V]
        loss_sum, correct_sum = mlm_sums(logits, micro.masked_labels, micro.masked_weights)
        sampled = jax.random.categorical(sample_key, jax.lax.stop_gradient(logits), axis=-1)  # [G, P]
        replaced = replace_masked(micro.input_ids, micro.masked_positions, micro.masked_weights, sampled)  # [B, L]
        sums = self._detect(model, params, replaced, ids, attention_mask, documents, deterministic=False,
                            rngs={"dropout": disc_key})
        loss = loss_sum / jnp.maximum(denominators["denominator"], 1.0) \
            + self.weight * sums["rtd_loss_sum"] / jnp.maximum(denominators["rtd_denominator"], 1.0)
        return loss, {"loss_sum": loss_sum, "accuracy_sum": correct_sum, **sums}

    def eval_sums(self, model, params, masked, ids, row_keys, *, attention_mask, documents: dict) -> dict:
        logits = model.apply({"params": params}, masked.input_ids, attention_mask=attention_mask,
                             deterministic=True, masked_positions=masked.masked_positions, **documents)  # [B, P, V]
        loss_sum, correct_sum = mlm_sums(logits, masked.masked_labels, masked.masked_weights)
        # Each row samples from its own key (results independent of batch size and devices).
        sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0x5A3D))(row_keys)
        sampled = jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1))(sample_keys, logits)  # [B, P]
        replaced = replace_masked(masked.input_ids, masked.masked_positions, masked.masked_weights, sampled)
        sums = self._detect(model, params, replaced, ids, attention_mask, documents, deterministic=True)
        return {"loss_sum": loss_sum, "accuracy_sum": correct_sum, **sums,
                "rtd_denominator": jnp.sum(attention_mask).astype(jnp.float32)}

    def eval_results(self, totals: dict) -> dict:
        n = max(float(totals.get("rtd_denominator", 0.0)), 1.0)
        return {"eval_rtd_loss": float(totals.get("rtd_loss_sum", 0.0)) / n,
                "eval_rtd_accuracy": float(totals.get("rtd_accuracy_sum", 0.0)) / n,
                "eval_replaced_fraction": float(totals.get("replaced_sum", 0.0)) / n}

    def record(self, window: list[dict]) -> dict:
        n = max(sum(float(m["rtd_denominator"]) for m in window), 1.0)
        return {"rtd_loss": sum(float(m["rtd_loss_sum"]) for m in window) / n,
                "rtd_accuracy": sum(float(m["rtd_accuracy_sum"]) for m in window) / n,
                "replaced_fraction": sum(float(m["replaced_sum"]) for m in window) / n}

    def export(self, loaded, params, mdir) -> None:
        """The discriminator in DIR (``ElectraForPreTraining``), the generator in DIR/generator
        (``ElectraForMaskedLM``, with its config.json and DIR's tokenizer files)."""
        import shutil

        from mlmtool.modeldir import TOKENIZER_FILES, atomic_write, atomic_write_json

        gen = mdir.generator
        loaded.save_hf(params, mdir.weights_path, carry_from=mdir.carried_weights)  # both files (hf_weights' parts)
        atomic_write_json(gen.config_path, loaded.family.generator_config(loaded.hf_config))
        for name in TOKENIZER_FILES:
            if (mdir.path / name).exists():
                atomic_write(gen.path / name, lambda tmp, src=mdir.path / name: shutil.copyfile(src, tmp))


def objective_for(loaded) -> Any:
    """The objective of a ``mlmtool.models.LoadedModel``: its parsed config's ``objective``
    (``mlm`` when the family names none)."""
    name = getattr(loaded.config, "objective", "mlm")
    if name == "mlm":
        return MaskedLM()
    if name == "replaced-token-detection":
        return ReplacedTokenDetection(loaded.family.rtd_weight)
    raise ConfigError(f"the {loaded.family.name} config has no training objective ({name})",
                      getattr(loaded.family, "objective_hint", None))
