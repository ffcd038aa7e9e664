"""From text to blocks: corpus readers, tokenizers, encoding, the block store and its (sharded)
preparation.
"""
