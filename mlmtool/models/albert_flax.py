"""The ALBERT masked-language model in Flax, computed exactly like transformers v5's
``AlbertForMaskedLM`` (tests check logit parity), parameter tree mirroring its ``state_dict``
(``E`` embedding_size, ``H`` hidden, ``I`` intermediate, ``V`` vocab)::

    embeddings/{word,position,token_type}_embeddings/embedding   [., E]  (word: tied decoder)
    embeddings/LayerNorm/{scale, bias}                            [E]
    encoder/embedding_hidden_mapping_in/{kernel [E, H], bias}
    encoder/albert_layer_groups/<g>/albert_layers/<j>/attention/{query,key,value,dense}/{kernel [H, H], bias}
    encoder/albert_layer_groups/<g>/albert_layers/<j>/attention/LayerNorm/{scale, bias}
    encoder/albert_layer_groups/<g>/albert_layers/<j>/{ffn [H, I], ffn_output [I, H]}/{kernel, bias}
    encoder/albert_layer_groups/<g>/albert_layers/<j>/full_layer_layer_norm/{scale, bias}
    predictions/dense/{kernel [H, E], bias}, predictions/LayerNorm/{scale, bias}, predictions/bias [V]

The block is BERT's post-LN block, without transformers' dropout after the feed-forward
(``AlbertLayer`` defines one and does not apply it).  The ``num_hidden_layers`` steps each run
one group, the same parameters again; ``remat`` checkpoints each step, and with ``scan`` the
steps run as one ``lax.scan`` that indexes the groups' stacked weights by the step's group
(the parameter tree stays the one above).  Mixed precision as in ``bert_flax``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlmtool.models.layers import ACTIVATIONS, REMAT_POLICIES, LayerStack, attention, embedding_init, layer_norm
from mlmtool.models.network import MaskedLMBase, SubModule, tied_logits


class _Base(SubModule):
    def norm(self, name: str | None = None) -> nn.LayerNorm:
        return layer_norm(self.config.layer_norm_eps, param_dtype=self.param_dtype, name=name)


class Embeddings(_Base):
    """HF ``AlbertEmbeddings``: word + token type + position (from 0), E wide, LayerNorm, dropout."""

    def setup(self):
        cfg = self.config
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        std = cfg.initializer_range
        self.word_embeddings = embed(cfg.vocab_size, cfg.embedding_size,
                                     embedding_init=embedding_init(std, cfg.pad_token_id))
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.embedding_size,
                                         embedding_init=embedding_init(std, None))
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.embedding_size,
                                           embedding_init=embedding_init(std, None))
        self.LayerNorm = self.norm()
        self.dropout = self.dropout_layer(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, deterministic: bool, positions=None):
        position_ids = jnp.arange(input_ids.shape[1])[None, :] if positions is None else positions  # [1|B, L]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)  # [B, L, E]
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class Attention(_Base):
    """HF ``AlbertAttention``: q/k/v, attention, ``dense``, dropout, add & LayerNorm."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape

        def project(name):  # [B, L, H] -> [B, L, N, D]
            return self.dense(cfg.hidden_size, name)(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)

        rate = cfg.attention_probs_dropout_prob
        dropout = None
        if not (deterministic or rate == 0.0):
            dropout = functools.partial(self.dropout_layer(rate), deterministic=False)
        out = attention(project("query"), project("key"), project("value"), attention_mask, kernels=self.kernels,
                        dropout=dropout).reshape(batch, length, cfg.hidden_size)  # [B, L, H]
        out = self.dropout_layer(cfg.hidden_dropout_prob)(self.dense(cfg.hidden_size, "dense")(out),
                                                          deterministic=deterministic)
        return self.norm("LayerNorm")(x + out)


class Layer(_Base):
    """HF ``AlbertLayer``: attention, then ffn, activation, ffn_output, add & full_layer_layer_norm."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        cfg = self.config
        x = Attention(**self.kw, name="attention")(x, attention_mask, deterministic)
        h = ACTIVATIONS[cfg.hidden_act](self.dense(cfg.intermediate_size, "ffn")(x))
        return self.norm("full_layer_layer_norm")(self.dense(cfg.hidden_size, "ffn_output")(h) + x)


class LayerGroup(_Base):
    """HF ``AlbertLayerGroup``: its ``albert_layers`` ("0", "1", ...) one after the other."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        return LayerStack(Layer, self.kw, self.config.inner_group_num, name="albert_layers")(
            x, attention_mask, deterministic)


class LayerGroups(_Base):
    """HF ``albert_layer_groups``: step i of num_hidden_layers runs group ``config.group_of(i)``."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        cfg = self.config
        policy = REMAT_POLICIES[self.remat]
        if self.scan and not self.is_initializing():
            return self._scanned(x, attention_mask, deterministic, policy)
        block = LayerGroup if self.remat == "none" else nn.remat(LayerGroup, policy=policy, static_argnums=(3,))
        groups = [block(**self.kw, name=str(g)) for g in range(cfg.num_hidden_groups)]
        for i in range(cfg.num_hidden_layers):
            x = groups[cfg.group_of(i)](x, attention_mask, deterministic)
        return x

    def _scanned(self, x, attention_mask, deterministic: bool, policy):
        cfg = self.config
        stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p),  # each leaf [G, ...]
                                         *[self.variables["params"][str(g)] for g in range(cfg.num_hidden_groups)])
        block = LayerGroup(**self.kw, parent=None)
        dropout_key = None if deterministic else self.make_rng("dropout")
        steps = jnp.arange(cfg.num_hidden_layers)
        groups = jnp.asarray([cfg.group_of(i) for i in range(cfg.num_hidden_layers)])

        def body(h, xs):
            group, i = xs
            weights = jax.tree_util.tree_map(lambda w: w[group], stacked)
            rngs = {} if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}
            return block.apply({"params": weights}, h, attention_mask, deterministic, rngs=rngs), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (groups, steps))  # [B, L, H]
        return x


class Encoder(_Base):
    """HF ``AlbertTransformer``: embedding_hidden_mapping_in (E -> H), then the groups."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        x = self.dense(self.config.hidden_size, "embedding_hidden_mapping_in")(x)  # [B, L, H]
        return LayerGroups(**self.kw, remat=self.remat, scan=self.scan, name="albert_layer_groups")(
            x, attention_mask, deterministic)


class MLMHead(_Base):
    """HF ``AlbertMLMHead``: dense (H -> E), activation, LayerNorm, the tied E-wide decoder."""

    @nn.compact
    def __call__(self, x, word_embeddings):
        cfg = self.config
        x = self.norm("LayerNorm")(ACTIVATIONS[cfg.hidden_act](self.dense(cfg.embedding_size, "dense")(x)))
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), self.param_dtype)
        return tied_logits(x, word_embeddings, bias, self.dtype)  # [..., V]


class MaskedLM(MaskedLMBase):
    """ALBERT with its MLM head (HF ``AlbertForMaskedLM``); the call is ``MaskedLMBase``'s."""

    def setup(self):
        self.embeddings = Embeddings(**self.kw)
        self.encoder = Encoder(**self.kw, remat=self.remat, scan=self.scan)
        self.predictions = MLMHead(**self.kw)

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        x = self.embeddings(input_ids, token_type_ids, deterministic, positions)  # [B, L, E]
        return self.encoder(x, attention_mask, deterministic)  # [B, L, H]

    def logits(self, x):
        return self.predictions(x, self.embeddings.word_embeddings.embedding)
