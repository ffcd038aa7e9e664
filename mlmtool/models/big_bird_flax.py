"""BigBird (full attention) in Flax: ``bert_flax``'s network plus the ``pooler`` that
transformers' ``BigBirdForMaskedLM`` carries (``bert.pooler``, a Dense [H, H]; the MLM never
uses it, so it is created at init and carried through training and the export untouched by
the loss)."""

from __future__ import annotations

from mlmtool.models import bert_flax
from mlmtool.models.layers import Dense, normal_init


class MaskedLM(bert_flax.MaskedLM):
    def setup(self):
        super().setup()
        self.pooler = Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=normal_init(self.config.initializer_range), form=self.kw["kernels"].dense)

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        x = super().encode(input_ids, attention_mask, token_type_ids, positions, deterministic)
        if self.is_initializing():
            self.pooler(x[:, 0])  # makes its parameters; its output is no part of the MLM
        return x
