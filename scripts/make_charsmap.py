"""Regenerate mlmtool/resources/nmt_nfkc.charsmap.gz: SentencePiece's ``nmt_nfkc``
normalization rule as the precompiled charsmap a ``tokenizers`` ``Precompiled`` normalizer
takes (the normalizer of XLM-R's and CamemBERT's tokenizer.json).

Needs ``pip install sentencepiece`` (a development tool only: mlmtool reads the stored file).
sentencepiece writes the rule's charsmap into every model it trains; a tiny model is trained
here and its ``normalizer_spec.precompiled_charsmap`` is taken.

    python scripts/make_charsmap.py
"""

from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mlmtool" / "resources" / "nmt_nfkc.charsmap.gz"


def main() -> None:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text("hello world\n" * 200 + "abc def ghi\n" * 200, encoding="utf-8")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(input=str(text), model_writer=model, vocab_size=18,
                                       normalization_rule_name="nmt_nfkc", minloglevel=3)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    OUT.write_bytes(gzip.compress(proto.normalizer_spec.precompiled_charsmap, compresslevel=9, mtime=0))
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
