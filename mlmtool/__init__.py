"""mlmtool: pre-train BERT/RoBERTa-style masked-language models in JAX/Flax.

Importing this package is cheap on purpose (no jax, no transformers): the CLI's
``--help`` path must stay fast.
"""

import os

# transformers advises installing PyTorch when it is absent; mlmtool never needs it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
