"""Masked-language-model pre-training: the loop (``Trainer``).

Follows the recipe of RoBERTa (Liu et al. 2019, arXiv:1907.11692) as HF's
``run_mlm_flax.py`` and the "Pre-Training a Transformers model on TPU with Flax/JAX"
notebook use it: dynamic masking (a fresh mask every step, on the device), AdamW with
beta2 = 0.98 and weight decay (off biases and norms), linear warm-up then linear decay.
The pieces: ``train_config`` (the settings), ``plan`` (the numbers), ``step`` (the pure,
jitted step and ``build_training``, the set-up), ``loader`` (the batches), ``stores`` (the
data's checks), ``periodic`` (the loop's actions: log, stop, eval, save, time budget); here
the Trainer restores or initialises the state, runs the loop, evaluates and exports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from mlmtool.data import blocks
from mlmtool.training import checkpoint
from mlmtool.runtime import distributed as dist, sharding as sh
from mlmtool import minimal_pairs
from mlmtool.errors import TrainingError
from mlmtool.training.evaluate import EVAL_MLM_PROBABILITY, evaluate, make_eval_fn, unigram_top_token
from mlmtool.training.loader import BatchLoader
from mlmtool.training.periodic import MetricsLog, PeriodicEval, PeriodicSave, Report, StopRequest, Tick, TimeBudget
from mlmtool.runtime.progress import MetricsWriter
from mlmtool.training.step import TrainState, build_model, build_training
from mlmtool.data.stores import document_starts, open_stores, word_boundaries_for
from mlmtool.training.train_config import TrainConfig, document_attention_for


class Trainer:
    """Builds the sharded state, restores or initialises it, runs the loop, exports.

    ``hf_config`` is config.json (a dict), ``train_config`` the ``TrainConfig``, ``model`` the
    ``LoadedModel`` (its ``module`` the flax network), ``training`` the ``step.Training``."""

    def __init__(self, mdir, train_config: TrainConfig, *, mesh_spec: str | None = None):
        error = None
        try:
            self._setup(mdir, train_config, mesh_spec)
        except Exception as e:  # fail on every process together, not on one while the others wait
            error = e
        dist.agree(None if error else self._settings(), error=error, what="training settings",
                 hint="start every process with the same options on the same model directory (prepared once on "
                      "shared storage, or identically on every host)")

    def _setup(self, mdir, cfg: TrainConfig, mesh_spec: str | None) -> None:
        cfg.validate()
        self.mdir = mdir = mdir.with_data(cfg.data)
        self.train_config = cfg
        self.hf_config = mdir.read_config()
        self.model = build_model(self.hf_config, cfg)
        self.train_store, self.val_store = open_stores(mdir, self.hf_config)
        self.mesh = sh.make_mesh(mesh_spec)
        self.main = sh.is_main_process()
        self.multi = jax.process_count() > 1
        # What the model learns from: the masking mode (whole words need the tokenizer's
        # word starts, on the device) and document attention (the family's default).
        family = self.model.family
        word_boundaries = word_boundaries_for(mdir, self.hf_config["vocab_size"]) if cfg.masking != "token" \
            else None
        self.document_attention = document_attention_for(family, cfg.document_attention)
        self.eval_documents = self.val_store is not None and document_starts(self.val_store, self.document_attention)
        self.training = build_training(self.model, cfg, self.train_store, self.mesh,
                                       n_val=len(self.val_store) if self.val_store else 0,
                                       word_boundaries=word_boundaries, document_attention=self.document_attention)
        # Each step's masking and dropout draw from fold_in(rng, step) (the initial weights
        # always from the seed's Threefry key, so --prng-impl changes only the per-step draws).
        self.rng = jax.random.key(cfg.seed, impl=cfg.prng_impl)
        self._eval_step = None  # built on first use, then reused
        self._judge = minimal_pairs.TrainingJudge(mdir, self.model, cfg.eval_minimal_pairs) \
            if cfg.eval_minimal_pairs else None  # --eval-minimal-pairs: read and checked before any step
        self.tokens_offset = 0  # tokens of the stages before this run (mlmtool.training.stages)
        self.budget = TimeBudget(cfg.max_time, multi=self.multi,  # --max-time (its clock: budget.now)
                                 agree=lambda seconds: float(dist.allgather_json(seconds)[0]))
        self.started_from: dict | None = None  # where this run's stage started, if from a checkpoint

    @property
    def plan(self):
        return self.training.plan

    def _settings(self) -> dict:
        """What must be the same on every process of a multi-process run (see dist.agree)."""
        return {**{f"--{k.replace('_', '-')}": v for k, v in dataclasses.asdict(self.train_config).items()},
                "mesh": dict(self.mesh.shape), "config.json": self.hf_config,
                "data": blocks.store_fingerprint(self.train_store, self.val_store)}

    # -- checkpoint metadata: what must match for a resume to continue the same run --
    def _run_identity(self) -> dict:
        return {"seed": self.train_config.seed, "global_batch": self.plan.global_batch,
                "per_device_train_batch_size": self.train_config.per_device_train_batch_size,
                "gradient_accumulation_steps": self.train_config.gradient_accumulation_steps,
                "devices": self.plan.devices, "train_blocks": self.plan.train_blocks,
                "seq_len": self.plan.seq_len}

    def _meta(self, step: int) -> dict:
        epoch, pos = divmod(step, self.plan.steps_per_epoch)
        return {"step": step, "epoch": epoch, "position_in_epoch": pos,
                "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),  # each step uses fold_in(rng, step)
                "run": self._run_identity(), "train_config": dataclasses.asdict(self.train_config),
                "config": self.hf_config,
                "total_steps": self.plan.total_steps, "tokens_seen": self._tokens_seen(step),
                "started_from": self.started_from, "elapsed_seconds": round(self.budget.elapsed(), 3)}

    def _tokens_seen(self, step: int) -> int:
        return self.tokens_offset + step * self.plan.tokens_per_step

    def initial_state(self, resume: bool, force: bool, say, from_checkpoint: str | None = None,
                      keep_optimizer_state: bool = False) -> tuple[TrainState, int]:
        if from_checkpoint is not None:
            return self._start_stage(from_checkpoint, keep_optimizer_state, say), 0
        t = self.training
        ckpt_dir = self.mdir.checkpoints_dir
        latest, error = None, None
        try:
            latest = checkpoint.latest_step(ckpt_dir)
        except Exception as e:
            error = e
        dist.agree(None if error else {"--resume": resume, "--force": force, "latest checkpoint": latest}, error=error,
                 what="checkpoints", hint=f"start every process with the same options; {ckpt_dir} must be one "
                                          "directory that every host shares (NFS, GCS-fuse, ...)")
        if latest is not None and not resume:
            if not force:
                raise TrainingError(f"{ckpt_dir} holds checkpoints up to step {latest}",
                                    "drop --no-resume to continue that run, or add --force to delete them and "
                                    "start over")
            error = None
            try:
                if self.main:
                    checkpoint.remove_all(ckpt_dir)
            except Exception as e:
                error = e
            dist.agree(error=error)  # also a barrier: no process looks at the directory before it is gone
            latest = None
        if latest is None:
            from mlmtool.init_from import exported_params, initial_params

            # A trained export (or a save_pretrained directory) first: continue from its weights, never
            # overwrite them with older ones; then the weights of 'mlmtool init DIR --from PATH'.
            params = exported_params(self.mdir, self.model, resume=resume, force=force, say=say)
            if params is None:
                params = initial_params(self.mdir, self.model, say)
            if params is not None:
                return t.state_at(0, jax.device_put(params, t.state_sharding.params)), 0
            return t.init_state(jax.random.fold_in(jax.random.PRNGKey(self.train_config.seed), 0xC0FFEE)), 0
        meta = checkpoint.restore_meta(ckpt_dir, latest)
        checkpoint.check_fits(ckpt_dir, latest, t.abstract_state.params)  # config.json changed?
        checkpoint.check_config(ckpt_dir, latest, meta, self.hf_config)
        before, now = meta.get("run", {}), self._run_identity()
        changed = [k for k in ("seed", "global_batch", "train_blocks", "seq_len") if before.get(k) != now[k]]
        if changed:
            was = ", ".join(f"{k}={before.get(k)}" for k in changed)
            now_ = ", ".join(f"{k}={now[k]}" for k in changed)
            raise TrainingError(
                f"the checkpoint at step {latest} was trained with {was}, this run has {now_}",
                "use the same settings to resume, or --no-resume --force to start over")
        with checkpoint.manager(ckpt_dir, async_save=False) as mngr:
            out = checkpoint.restore(mngr, latest, t.abstract_state.params, t.abstract_state.opt_state,
                                     config=self.hf_config)
        state = t.state_at(latest, out["params"], out["opt_state"])
        self.started_from = meta.get("started_from")
        self.tokens_offset = (self.started_from or {}).get("tokens_seen", 0)
        self.budget.before = float(meta.get("elapsed_seconds") or 0.0)
        say(f"Resuming from checkpoint step {latest:,} (of {self.plan.total_steps:,}) in {ckpt_dir}")
        return state, latest

    def _start_stage(self, source: str, keep_optimizer_state: bool, say) -> TrainState:
        """A new run from another run's checkpoint (mlmtool.training.stages): its weights, and with
        ``keep_optimizer_state`` its optimizer moments; checked and restored in memory, its
        step 0 saved, and only then the stage before archived."""
        from mlmtool.training import stages
        from mlmtool.errors import CheckpointError

        src, error = None, None
        try:
            src = stages.resolve(source, self.mdir)
            meta = checkpoint.restore_meta(*src[:2])
            if keep_optimizer_state:
                was = (meta.get("train_config") or {}).get("optimizer", "adamw")
                if was != self.train_config.optimizer:
                    raise TrainingError(f"--keep-optimizer-state: checkpoint step {src[1]} holds the state of "
                                        f"--optimizer {was}, this run has --optimizer {self.train_config.optimizer}",
                                        f"use --optimizer {was}, or drop --keep-optimizer-state")
            stages.check_source(source, src[0], src[1], meta, self.hf_config, self.training.abstract_state.params)
            with checkpoint.manager(src[0], read_only=True, async_save=False) as mngr:
                try:
                    out = checkpoint.restore(mngr, src[1], self.training.abstract_state.params,
                                             self.training.abstract_state.opt_state if keep_optimizer_state else None)
                except CheckpointError as e:
                    raise TrainingError(f"--from-checkpoint {source}: {e.message}",
                                        "give another checkpoint (nothing was moved: DIR's checkpoints are as they "
                                        "were)") from e
        except Exception as e:
            error = e
        dist.agree(None if error else {"--from-checkpoint": [str(src[0].absolute()), src[1]]}, error=error,
                 what="--from-checkpoint", hint="start every process with the same options")
        src_dir, step, own = src
        archive = stages.next_archive(self.mdir)  # where DIR's checkpoints will go
        run = meta.get("run", {})
        tokens = meta.get("tokens_seen", step * run.get("global_batch", 0) * run.get("seq_len", 0))
        self.tokens_offset = int(tokens)
        self.started_from = {"checkpoint": str(Path(archive if own else src_dir).absolute() / str(step)),
                             "step": step, "tokens_seen": int(tokens), "optimizer_state": keep_optimizer_state}
        state = self.training.state_at(0, out["params"], out["opt_state"] if keep_optimizer_state else None)

        def save_step0(folder: Path) -> None:
            with checkpoint.manager(folder, async_save=False) as mngr:
                checkpoint.save(mngr, 0, state.params, state.opt_state, self._meta(0))
                checkpoint.wait(mngr)

        moved = stages.begin(self.mdir, self.main, save_step0, dist.agree) or archive
        where = (f"step {step:,} of the run before (its checkpoints are kept in {moved})" if own else
                 f"checkpoint step {step:,} in {src_dir}"
                 + (f" (DIR's checkpoints are kept in {moved})" if moved else ""))
        say(f"New stage from {where}, {tokens:,} tokens seen, "
            + ("with its optimizer state" if keep_optimizer_state else "with a fresh optimizer state"))
        return state

    def evaluate(self, params) -> dict:
        """``mlmtool eval``'s measure, whatever the training masking: 15% token masking, so
        runs with other rates and modes compare; document attention as trained."""
        if self._eval_step is None:
            self._eval_step = make_eval_fn(self.model.module, self.mesh, self.training.state_sharding.params,
                                           store=self.val_store,
                                           mlm_probability=EVAL_MLM_PROBABILITY,
                                           vocab_size=self.train_store.vocab_size,
                                           baseline_token=unigram_top_token(self.train_store),
                                           documents=self.eval_documents,
                                           objective=self.training.objective)
        per_device = self.train_config.per_device_eval_batch_size or self.train_config.per_device_train_batch_size
        results = evaluate(params, step=self._eval_step, mesh=self.mesh, store=self.val_store,
                           per_device_batch_size=per_device, objective=self.training.objective,
                           documents=self.eval_documents)
        return results if self._judge is None else {**results, **self._judge(params)}

    def run(self, *, resume: bool = True, force: bool = False, progress=None, say=print,
            stop_requested=lambda: False, on_start=None, from_checkpoint: str | None = None,
            keep_optimizer_state: bool = False, on_step=None) -> dict:
        """Train to ``plan.total_steps``; returns the last logged metrics and eval results.
        ``on_start()`` runs once the starting state is settled (a refused run never calls it).
        ``from_checkpoint`` starts a new stage from that checkpoint (mlmtool.training.stages).
        ``on_step(metrics)`` runs after each step (``--profile-steps``: mlmtool.training.profiling)."""
        plan, budget = self.plan, self.budget
        state, start = self.initial_state(resume, force, say, from_checkpoint, keep_optimizer_state)
        if on_start is not None:
            on_start()
        report = self._report(progress)
        report.started(start)
        result: dict = {"start_step": start, "total_steps": plan.total_steps, "stopped_early": False}
        if start >= plan.total_steps or budget.spent:
            say(f"Training already complete at step {start:,}"
                + (f" (its {budget.seconds:,.0f} s budget is spent)." if budget.spent else "."))
        if budget.on:
            report.time_budget(budget.left)
        loader = self._loader(start, stop=start if budget.spent else plan.total_steps)
        with checkpoint.manager(self.mdir.checkpoints_dir, max_to_keep=self.train_config.save_total_limit) as mngr:
            log, stop, evaluations, saves = self._actions(report, stop_requested, mngr)
            budget.start()
            try:
                for step, batch in loader:
                    state, metrics = self.training.step(state, batch, self.rng, *budget.position(plan.total_steps))
                    log.add(metrics)
                    if on_step is not None:
                        on_step(metrics)
                    done = step + 1
                    if done == start + 1:  # compilation is not throughput
                        result["compile_seconds"] = log.first_step(metrics)
                        report.compiled(result["compile_seconds"], done)
                    out_of_time = budget.after_step(done)
                    last = done == plan.total_steps or out_of_time
                    tick = Tick(done, last, stop(done, last))
                    report.step(done)
                    log(tick, mngr.latest_step)
                    evaluations(tick, state.params)
                    saves(tick, state)
                    if tick.stop and not last:
                        result["stopped_early"] = True
                        break
                    if out_of_time:
                        say(f"The {budget.seconds:,.0f} s budget is spent at step {done:,}.")
                        break
            finally:
                loader.close()
                checkpoint.wait(mngr)
        budget.pause()
        result.update({"train": log.last} if log.last else {}, final_step=int(jax.device_get(state.step)))
        if result["stopped_early"]:
            return result
        return {**result, **self._finish(state.params, result["final_step"], report)}

    def _report(self, progress) -> Report:
        writer = MetricsWriter(self.mdir.metrics_path, enabled=self.main, tensorboard_dir=self.mdir.tensorboard_dir)
        return Report(writer, progress)

    def _loader(self, start: int, stop: int) -> BatchLoader:
        cfg, plan = self.train_config, self.plan
        return BatchLoader(self.train_store, accum=cfg.gradient_accumulation_steps,
                           micro_batch=plan.global_batch // cfg.gradient_accumulation_steps, seed=cfg.seed,
                           steps_per_epoch=plan.steps_per_epoch, sharding=self.training.batch_sharding,
                           start=start, stop=stop, documents=self.training.step_kwargs["documents"])

    def _actions(self, report: Report, stop_requested, mngr) -> tuple:
        """The loop's periodic actions (mlmtool.training.periodic): log, stop, eval, save."""
        cfg = self.train_config
        log = MetricsLog(self.plan, self.training.objective, report, logging_steps=cfg.logging_steps,
                         save_steps=cfg.save_steps, tokens_seen=self._tokens_seen, max_grad_norm=cfg.max_grad_norm,
                         mlm_probability=cfg.mlm_probability, prepare_command=self.mdir.prepare_command("--force"))
        stop = StopRequest(stop_requested, logging_steps=cfg.logging_steps, multi=self.multi,
                           any_process=dist.any_process)
        evaluations = PeriodicEval(cfg.eval_steps, self.evaluate if self.val_store is not None else None, report, log)
        saves = PeriodicSave(cfg.save_steps, lambda done, state: checkpoint.save(
            mngr, done, state.params, state.opt_state, self._meta(done)))
        return log, stop, evaluations, saves

    def _finish(self, params, final_step: int, report: Report) -> dict:
        """The final evaluation, then the export (what transformers loads)."""
        out = {}
        if self.val_store is not None:
            out["eval"] = self.evaluate(params)
            report.evaluation(final_step, out["eval"])
        params = jax.device_get(params) if jax.process_count() == 1 else _gather(params)
        if self.main:
            self.training.objective.export(self.model, params, self.mdir)
        out["exported"] = str(self.mdir.weights_path)
        return out


def _gather(tree):
    """Fully replicate a (possibly sharded, multi-process) pytree and fetch it to the host."""
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
