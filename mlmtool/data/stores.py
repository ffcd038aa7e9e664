"""The block stores a run reads, checked against the model they are for (train and eval)."""

from __future__ import annotations

from mlmtool.errors import DataError
from mlmtool.modeldir import file_sha256


def open_stores(mdir, config: dict, *, what: str = "train"):
    """DIR's (train, validation or None) block stores, checked against config.json and the
    tokenizer: the vocabulary, the tokenizer the data was made with, the sequence length
    against the model's positions.  ``what`` ("train" or "eval") names the command in errors;
    eval also requires the validation split."""
    from mlmtool.data.blocks import BlockStore, read_meta
    from mlmtool.presets import max_sequence_length

    mdir.require_data()
    meta = read_meta(mdir.data_dir)
    train_store = BlockStore.open(mdir.data_dir, "train")
    has_validation = meta.get("num_blocks", {}).get("validation", 0)
    val_store = BlockStore.open(mdir.data_dir, "validation") if has_validation else None
    # The model's vocab_size the data was prepared for: the tokenizer's size or more (a padded
    # embedding matrix); stores made before model_vocab_size was recorded required them equal.
    prepared_for = meta.get("model_vocab_size", train_store.vocab_size)
    if prepared_for != config["vocab_size"] or train_store.vocab_size > config["vocab_size"]:
        raise DataError(
            f"the prepared data was made with a vocabulary of {prepared_for} but config.json says "
            f"vocab_size={config['vocab_size']}",
            f"put back vocab_size={prepared_for} in {mdir.config_path} if it was edited, or (a retrained "
            f"tokenizer) prepare the data again: '{mdir.prepare_command('--force')}'")
    check_tokenizer(mdir, meta)
    if train_store.seq_len > max_sequence_length(config):
        raise DataError(f"blocks of {train_store.seq_len} tokens exceed the model's "
                        f"{max_sequence_length(config)} positions",
                        f"run '{mdir.prepare_command('--max-seq-length', str(max_sequence_length(config)))} --force'")
    if what == "eval" and val_store is None:
        raise DataError(f"the prepared data in {mdir} has no validation blocks",
                        f"run '{mdir.prepare_command('--validation-split-percentage', '5', '--force')}'")
    return train_store, val_store


def check_tokenizer(mdir, meta: dict) -> None:
    """The export is a Hugging Face directory: its tokenizer.json must be the one the data was made with."""
    want = meta.get("tokenizer_sha256")
    path = mdir.tokenizer_path
    if not want or not path.exists():
        return
    if file_sha256(path) != want:
        raise DataError(f"{path} is not the tokenizer the data in {mdir.data_dir} was prepared with "
                        "(it was retrained, replaced or damaged)",
                        f"retrain it with 'mlmtool tokenizer {mdir} FILE...' if it is damaged, then run "
                        f"'{mdir.prepare_command('--force')}'")


def word_boundaries_for(mdir, vocab_size: int):
    """The uint8 [vocab_size] word-start table of DIR's tokenizer (whole-word and span masking)."""
    import json

    from mlmtool.errors import ConfigError
    from mlmtool.data.tokenizer_facts import word_boundaries

    path = mdir.require_tokenizer()
    try:
        return word_boundaries(json.loads(path.read_text(encoding="utf-8")), vocab_size)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", e.hint) from None


_NOTED: set[str] = set()  # the stores whose missing record was noted (once per run)


def document_starts(store, document_attention: bool) -> bool:
    """Whether the batches of ``store`` carry where their documents start (the step makes
    document attention's segment ids of them): with document attention, unless the blocks hold
    one document each (``--line-by-line``: it changes nothing).  A store made before ``prepare``
    recorded the starts has them derived from the ``<s>``/``[CLS]`` id
    (``BlockStore.read_documents``), which this says in one line."""
    if not document_attention or store.line_by_line:
        return False
    if not store.has_starts and str(store.path.parent) not in _NOTED:
        from mlmtool.runtime.progress import say

        _NOTED.add(str(store.path.parent))
        say(f"Note: the blocks in {store.path.parent} record no document starts (prepared by an older mlmtool): "
            f"they are taken where the {store.meta.get('cls_token_id')} (<s>/[CLS]) id is; prepare again with "
            "--force to record them", soft_wrap=True)
    return True
