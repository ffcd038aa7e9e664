"""mlmtool: pre-train masked-language encoders (RoBERTa, BERT, XLM-R, DistilBERT, ...) in JAX/Flax.

Importing this package is cheap on purpose (no jax, no transformers): the CLI's
``--help`` path must stay fast.
"""

__version__ = "0.1.0"
