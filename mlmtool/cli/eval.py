"""``mlmtool eval DIR``: loss, accuracy and perplexity on the validation split."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlmtool import constants
from mlmtool.cli import app
from mlmtool.cli.options import (CheckpointOpt, DataOpt, Distributed, DocumentAttentionOpt, DtypeOpt, JsonOpt,
                                 MaskingOpt, MlmProbabilityOpt, ModelDirArg, PerDeviceEvalBatchOpt, choice, emit,
                                 option_groups)


@app.command("eval")
@option_groups
def eval_command(
    model_dir: ModelDirArg,
    checkpoint: CheckpointOpt = constants.LATEST,
    per_device_eval_batch_size: PerDeviceEvalBatchOpt = None,
    mlm_probability: MlmProbabilityOpt = constants.EVAL_MLM_PROBABILITY,
    masking: MaskingOpt = constants.MASKING_MODES[0],
    document_attention: DocumentAttentionOpt = None,
    dtype: DtypeOpt = constants.DTYPES[0],
    data: DataOpt = None,
    json_out: JsonOpt = False,
    dist: Distributed = Distributed(),
    minimal_pairs: Annotated[Optional[list[str]], typer.Option(
        "--minimal-pairs", help="Score these JSON-lines files of minimal pairs (BLiMP's format: sentence_good, "
                                "sentence_bad, optional UID) by pseudo-log-likelihood (ELECTRA: by the "
                                "discriminator) instead of the masked-LM "
                                "evaluation (repeatable; docs/judging.md).", show_default=False)] = None,
    pll: Annotated[str, choice(
        "--pll", constants.PLL_MODES,
        help="With --minimal-pairs: word-l2r (Kauf & Ivanova 2023: a scored token's word is masked to "
             "its right too) | token (Salazar et al. 2020).")] = constants.PLL_MODES[0],
) -> None:
    """Evaluate the trained model on the validation blocks; writes eval_results.json."""
    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.progress import say
    from mlmtool.runtime.distributed import agree
    from mlmtool.runtime.sharding import is_main_process

    dist.join()
    mdir = error = None
    try:
        mdir = ModelDir(model_dir)
        if data == "data":  # DIR/data, whatever the latest run trained on
            data = ""
        if data is None:  # the store DIR's latest run trained on (a stage's --data), as report shows it
            from mlmtool.report import trained_store

            data = trained_store(mdir)
            if data is not None and not mdir.with_data(data).data_dir.is_dir():
                data = None
        mdir = mdir.with_data(data or None)
    except Exception as e:
        error = e
    agree(error=error)  # a host without DIR stops every process, not just itself
    if minimal_pairs:
        _minimal_pairs(mdir, minimal_pairs, checkpoint=checkpoint, pll=pll, dtype=dtype, json_out=json_out)
        return
    from mlmtool.training.evaluate import run_eval

    results = run_eval(mdir, checkpoint=checkpoint, per_device_batch_size=per_device_eval_batch_size,
                       mlm_probability=mlm_probability, dtype=dtype, mesh_spec=dist.mesh, masking=masking,
                       document_attention=document_attention)
    if not is_main_process():  # process 0 reports for the whole run
        return
    if json_out:
        emit(results)
        return
    say(f"[bold]eval[/] ({results['checkpoint']}) on {results['eval_samples']:,} blocks of {mdir.data_dir.name}, "
        f"{results['eval_tokens']:,} predicted tokens ({masking} masking {mlm_probability:.0%}, document attention "
        f"{'on' if results['document_attention'] else 'off'})")
    say(f"  eval_loss     {results['eval_loss']:.4f}")
    say(f"  eval_accuracy {results['eval_accuracy']:.4f}")
    say(f"  perplexity    {results['perplexity']:.2f}")
    say(f"  (unigram baseline accuracy {results['eval_unigram_baseline_accuracy']:.4f}: always predicting "
        f"the most frequent training token)")
    if "eval_rtd_accuracy" in results:  # ELECTRA: the numbers above are the generator's
        say(f"  discriminator: replaced-token accuracy {results['eval_rtd_accuracy']:.4f}, loss "
            f"{results['eval_rtd_loss']:.4f} ({results['eval_replaced_fraction']:.1%} of the tokens replaced)")
    say(f"Wrote {mdir.eval_results_path}")


def _minimal_pairs(mdir, files, *, checkpoint: str, pll: str, dtype: str, json_out: bool) -> None:
    from mlmtool.minimal_pairs import format_results, run_minimal_pairs
    from mlmtool.runtime.progress import say
    from mlmtool.runtime.sharding import is_main_process

    results = run_minimal_pairs(mdir, files, checkpoint=checkpoint, pll=pll, dtype=dtype)
    if not is_main_process():
        return
    if json_out:
        emit(results)
        return
    say(f"[bold]minimal pairs[/] ({results['checkpoint']}, {results['scorer']}): accuracy per set")
    from rich.markup import escape

    for line in format_results(results):
        say(escape(line))
    say(f"Wrote {mdir.eval_results_path}")
