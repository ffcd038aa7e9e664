"""Masked-language-model pre-training: the loop (``Trainer``).

Follows the recipe of RoBERTa (Liu et al. 2019, arXiv:1907.11692) as HF's
``run_mlm_flax.py`` and the "Pre-Training a Transformers model on TPU with Flax/JAX"
notebook use it: dynamic masking (a fresh mask every step, on the device), AdamW with
beta2 = 0.98 and weight decay (off biases and norms), linear warm-up then linear decay.
The pieces: ``train_config`` (the settings), ``plan`` (the numbers), ``step`` (the pure,
jitted step), ``loader`` (the batches), ``stores`` (the data's checks); here the Trainer sets
them up, restores or initialises the state, runs, evaluates, checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlmtool import blocks, checkpoint, distributed as dist, minimal_pairs, sharding as sh
from mlmtool.errors import TrainingError
from mlmtool.evaluate import EVAL_MLM_PROBABILITY, evaluate, make_eval_fn, unigram_top_token
from mlmtool.flops import peak_flops, training_flops_per_token
from mlmtool.loader import BatchLoader
from mlmtool.objectives import objective_for
from mlmtool.masking import row_count_variance
from mlmtool.optim import make_optimizer, make_schedule
from mlmtool.plan import max_mlm_probability, plan_training
from mlmtool.step import TrainState, build_model, jit_train_step, state_shardings
from mlmtool.stores import document_starts, open_stores, word_boundaries_for
from mlmtool.train_config import TrainConfig, document_attention_for

STOP_CHECK_EVERY = 10  # multi-process: steps between agreeing on a stop request (a host sync)


def _describe_execution(model) -> str:
    text = model.kernels.describe()
    if model.remat != "none":
        text += f"; gradient checkpointing {model.remat}"
    scanned = model.remat != "none" if model.scan_layers is None else model.scan_layers
    return text + ("; layers scanned" if scanned else "")


def _describe_masking(cfg: TrainConfig, plan, document_attention: bool, line_by_line: bool) -> str:
    rate = f"{cfg.mlm_probability:.0%}"
    if cfg.mlm_probability_final is not None and cfg.mlm_probability_final != cfg.mlm_probability:
        rate += f" -> {cfg.mlm_probability_final:.0%} (linear by step)"
    documents = "on" if document_attention else "off"
    if document_attention and line_by_line:
        documents += " (one document per --line-by-line block: nothing to separate)"
    return (f"{cfg.masking} {rate}, {plan.prediction_slots:,} prediction slots per {plan.rows_per_group} "
            f"row{'s' if plan.rows_per_group > 1 else ''}; document attention {documents}")


class Trainer:
    """Builds the sharded state, restores or initialises it, runs the loop, exports."""

    def __init__(self, mdir, cfg: TrainConfig, *, mesh_spec: str | None = None):
        error = None
        try:
            self._setup(mdir, cfg, mesh_spec)
        except Exception as e:  # fail on every process together, not on one while the others wait
            error = e
        dist.agree(None if error else self._settings(), error=error, what="training settings",
                 hint="start every process with the same options on the same model directory (prepared once on "
                      "shared storage, or identically on every host)")

    def _setup(self, mdir, cfg: TrainConfig, mesh_spec: str | None) -> None:
        cfg.validate()
        self.mdir = mdir = mdir.with_data(cfg.data)
        self.cfg = cfg
        self.config = mdir.read_config()
        self.loaded = build_model(self.config, cfg)
        self.model = self.loaded.module
        self.objective = objective_for(self.loaded)  # the loss: MLM, or ELECTRA's replaced-token detection
        self.train_store, self.val_store = open_stores(mdir, self.config)
        self.mesh = sh.make_mesh(mesh_spec)
        self.main = sh.is_main_process()
        self.multi = jax.process_count() > 1
        devs = sh.device_summary()

        store = self.train_store
        # What the model learns from: the masking mode (whole words need the tokenizer's
        # word starts, on the device) and document attention (the family's default).
        family = self.loaded.family
        self.word_boundaries = word_boundaries_for(mdir, self.config["vocab_size"]) if cfg.masking != "token" \
            else None
        self.document_attention = document_attention_for(family, cfg.document_attention)
        self.mask_kwargs = dict(special_token_ids=tuple(store.special_token_ids), mask_token_id=store.mask_token_id,
                                vocab_size=store.vocab_size, mlm_probability=cfg.mlm_probability,
                                masking=cfg.masking, word_boundaries=self.word_boundaries)
        row_variance = None
        if cfg.masking != "token" and not cfg.max_predictions_per_seq:
            # Whole words and spans: slots from the spread measured on a fixed sample of the data.
            sample = np.unique(np.linspace(0, len(store) - 1, num=min(len(store), 1024)).astype(np.int64))
            row_variance = row_count_variance(store.read(sample), {**self.mask_kwargs,
                                                                   "mlm_probability": max_mlm_probability(cfg)})

        n_params = self.loaded.parameter_count
        self.plan = plan_training(cfg, n_train=len(self.train_store),
                                  n_val=len(self.val_store) if self.val_store else 0,
                                  seq_len=self.train_store.seq_len, n_devices=self.mesh.size,
                                  parameters=n_params, mesh=dict(self.mesh.shape), platform=devs["platform"],
                                  processes=devs["processes"], row_variance=row_variance)
        slot_share = self.plan.prediction_slots / (self.plan.rows_per_group * self.plan.seq_len)
        self.plan = dataclasses.replace(
            self.plan, device_kind=devs["device_kind"], kernels=_describe_execution(self.model),
            masking=_describe_masking(cfg, self.plan, self.document_attention, store.line_by_line),
            flops_per_token=training_flops_per_token(self.config, self.plan.seq_len, slot_share)["executed"],
            peak_flops=peak_flops(devs["device_kind"], cfg.dtype))
        self.schedule = make_schedule(cfg, self.plan.total_steps, self.plan.warmup_steps)
        self.tx = make_optimizer(cfg, self.schedule, self.loaded.decay_mask)

        def init_state(rng):
            params = self.loaded.init(rng)
            return TrainState(step=jnp.int32(0), params=params, opt_state=self.tx.init(params))

        abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
        self.state_sharding = state_shardings(self.mesh, abstract_state, self.loaded.param_axes)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_sharding)
        self._init_state = jax.jit(init_state, out_shardings=self.state_sharding)

        self.mask_kwargs.update(max_predictions=self.plan.prediction_slots, rows_per_group=self.plan.rows_per_group)
        rate_schedule = None
        if cfg.mlm_probability_final is not None and cfg.mlm_probability_final != cfg.mlm_probability:
            rate_schedule = (cfg.mlm_probability_final, self.plan.total_steps)
        self.step_kwargs = dict(pad_token_id=store.pad_token_id, mask_kwargs=self.mask_kwargs,
                                rate_schedule=rate_schedule, clock=cfg.max_time > 0,
                                documents=document_starts(store, self.document_attention),
                                objective=self.objective)
        self.eval_documents = self.val_store is not None and document_starts(self.val_store, self.document_attention)
        self.row_variance = row_variance  # what sized the prediction slots (mlmtool.dryrun re-sizes them)
        self._step, self.batch_sharding = jit_train_step(self.model, self.tx, self.schedule, self.mesh,
                                                         self.state_sharding, **self.step_kwargs)
        # Each step's masking and dropout draw from fold_in(rng, step) (the initial weights
        # always from the seed's Threefry key, so --prng-impl changes only the per-step draws).
        self.rng = jax.random.key(cfg.seed, impl=cfg.prng_impl)
        self._eval_step = None  # built on first use, then reused
        self._judge = minimal_pairs.TrainingJudge(mdir, self.loaded, cfg.eval_minimal_pairs) \
            if cfg.eval_minimal_pairs else None  # --eval-minimal-pairs: read and checked before any step
        self.tokens_offset = 0  # tokens of the stages before this run (mlmtool.stages)
        self.elapsed_before = 0.0  # --max-time: seconds this run trained before its resume
        self._clock_start: float | None = None
        self._now = time.perf_counter  # --max-time's clock (tests give it a fake one)
        self.started_from: dict | None = None  # where this run's stage started, if from a checkpoint

    def _settings(self) -> dict:
        """What must be the same on every process of a multi-process run (see dist.agree)."""
        return {**{f"--{k.replace('_', '-')}": v for k, v in dataclasses.asdict(self.cfg).items()},
                "mesh": dict(self.mesh.shape), "config.json": self.config,
                "data": blocks.store_fingerprint(self.train_store, self.val_store)}

    # -- checkpoint metadata: what must match for a resume to continue the same run --
    def _run_identity(self) -> dict:
        return {"seed": self.cfg.seed, "global_batch": self.plan.global_batch,
                "per_device_train_batch_size": self.cfg.per_device_train_batch_size,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "devices": self.plan.devices, "train_blocks": self.plan.train_blocks,
                "seq_len": self.plan.seq_len}

    def _meta(self, step: int) -> dict:
        epoch, pos = divmod(step, self.plan.steps_per_epoch)
        return {"step": step, "epoch": epoch, "position_in_epoch": pos,
                "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),  # each step uses fold_in(rng, step)
                "run": self._run_identity(), "train_config": dataclasses.asdict(self.cfg), "config": self.config,
                "total_steps": self.plan.total_steps, "tokens_seen": self._tokens_seen(step),
                "started_from": self.started_from, "elapsed_seconds": round(self._elapsed(), 3)}

    def _elapsed(self) -> float:
        """Seconds this run has trained, its resumed parts included (``--max-time``'s clock)."""
        running = 0.0 if self._clock_start is None else self._now() - self._clock_start
        return self.elapsed_before + running

    def _tokens_seen(self, step: int) -> int:
        return self.tokens_offset + step * self.plan.tokens_per_step

    def initial_state(self, resume: bool, force: bool, say, from_checkpoint: str | None = None,
                      keep_optimizer_state: bool = False) -> tuple[TrainState, int]:
        if from_checkpoint is not None:
            return self._start_stage(from_checkpoint, keep_optimizer_state, say), 0
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
            params = exported_params(self.mdir, self.loaded, resume=resume, force=force, say=say)
            if params is None:
                params = initial_params(self.mdir, self.loaded, say)
            if params is not None:
                params = jax.device_put(params, self.state_sharding.params)
                opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
                return TrainState(step=jax.device_put(jnp.int32(0), self.state_sharding.step), params=params,
                                  opt_state=opt_state), 0
            return self._init_state(jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 0xC0FFEE)), 0
        meta = checkpoint.restore_meta(ckpt_dir, latest)
        checkpoint.check_fits(ckpt_dir, latest, self.abstract_state.params)  # config.json changed?
        checkpoint.check_config(ckpt_dir, latest, meta, self.config)
        before, now = meta.get("run", {}), self._run_identity()
        changed = [k for k in ("seed", "global_batch", "train_blocks", "seq_len") if before.get(k) != now[k]]
        if changed:
            was = ", ".join(f"{k}={before.get(k)}" for k in changed)
            now_ = ", ".join(f"{k}={now[k]}" for k in changed)
            raise TrainingError(
                f"the checkpoint at step {latest} was trained with {was}, this run has {now_}",
                "use the same settings to resume, or --no-resume --force to start over")
        with checkpoint.manager(ckpt_dir, async_save=False) as mngr:
            out = checkpoint.restore(mngr, latest, self.abstract_state.params, self.abstract_state.opt_state,
                                     config=self.config)
        state = TrainState(step=jax.device_put(jnp.int32(latest), self.state_sharding.step),
                           params=out["params"], opt_state=out["opt_state"])
        self.started_from = meta.get("started_from")
        self.tokens_offset = (self.started_from or {}).get("tokens_seen", 0)
        self.elapsed_before = float(meta.get("elapsed_seconds") or 0.0)
        say(f"Resuming from checkpoint step {latest:,} (of {self.plan.total_steps:,}) in {ckpt_dir}")
        return state, latest

    def _start_stage(self, source: str, keep_optimizer_state: bool, say) -> TrainState:
        """A new run from another run's checkpoint (mlmtool.stages): its weights, and with
        ``keep_optimizer_state`` its optimizer moments; checked and restored in memory, its
        step 0 saved, and only then the stage before archived."""
        from mlmtool import stages
        from mlmtool.errors import CheckpointError

        src, error = None, None
        try:
            src = stages.resolve(source, self.mdir)
            meta = checkpoint.restore_meta(*src[:2])
            if keep_optimizer_state:
                was = (meta.get("train_config") or {}).get("optimizer", "adamw")
                if was != self.cfg.optimizer:
                    raise TrainingError(f"--keep-optimizer-state: checkpoint step {src[1]} holds the state of "
                                        f"--optimizer {was}, this run has --optimizer {self.cfg.optimizer}",
                                        f"use --optimizer {was}, or drop --keep-optimizer-state")
            stages.check_source(source, src[0], src[1], meta, self.config, self.abstract_state.params)
            with checkpoint.manager(src[0], read_only=True, async_save=False) as mngr:
                try:
                    out = checkpoint.restore(mngr, src[1], self.abstract_state.params,
                                             self.abstract_state.opt_state if keep_optimizer_state else None)
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
        params = out["params"]
        opt_state = out["opt_state"] if keep_optimizer_state else \
            jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
        run = meta.get("run", {})
        tokens = meta.get("tokens_seen", step * run.get("global_batch", 0) * run.get("seq_len", 0))
        self.tokens_offset = int(tokens)
        self.started_from = {"checkpoint": str(Path(archive if own else src_dir).absolute() / str(step)),
                             "step": step, "tokens_seen": int(tokens), "optimizer_state": keep_optimizer_state}
        state = TrainState(step=jax.device_put(jnp.int32(0), self.state_sharding.step), params=params,
                           opt_state=opt_state)

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
            self._eval_step = make_eval_fn(self.model, self.mesh, self.state_sharding.params, store=self.val_store,
                                           mlm_probability=EVAL_MLM_PROBABILITY,
                                           vocab_size=self.train_store.vocab_size,
                                           baseline_token=unigram_top_token(self.train_store),
                                           documents=self.eval_documents,
                                           objective=self.objective)
        per_device = self.cfg.per_device_eval_batch_size or self.cfg.per_device_train_batch_size
        results = evaluate(params, step=self._eval_step, mesh=self.mesh, store=self.val_store,
                           per_device_batch_size=per_device, objective=self.objective, documents=self.eval_documents)
        return results if self._judge is None else {**results, **self._judge(params)}

    def run(self, *, resume: bool = True, force: bool = False, progress=None, say=print,
            stop_requested=lambda: False, on_start=None, from_checkpoint: str | None = None,
            keep_optimizer_state: bool = False, on_step=None) -> dict:
        """Train to ``plan.total_steps``; returns the last logged metrics and eval results.
        ``on_start()`` runs once the starting state is settled (a refused run never calls it).
        ``from_checkpoint`` starts a new stage from that checkpoint (mlmtool.stages).
        ``on_step(metrics)`` runs after each step (``--profile-steps``: mlmtool.profiling)."""
        from mlmtool.progress import MetricsWriter

        cfg, plan = self.cfg, self.plan
        state, start = self.initial_state(resume, force, say, from_checkpoint, keep_optimizer_state)
        if on_start is not None:
            on_start()
        if progress is not None:
            progress.started(start)
        writer = MetricsWriter(self.mdir.metrics_path, enabled=self.main, tensorboard_dir=self.mdir.tensorboard_dir)
        result: dict = {"start_step": start, "total_steps": plan.total_steps}
        budget = cfg.max_time
        spent = budget > 0 and self.elapsed_before >= budget
        if start >= plan.total_steps or spent:
            say(f"Training already complete at step {start:,}"
                + (f" (its {budget:,.0f} s budget is spent)." if spent else "."))
        if budget > 0 and progress is not None:
            progress.time_budget(budget - self.elapsed_before)
        loader = BatchLoader(self.train_store, accum=cfg.gradient_accumulation_steps,
                             micro_batch=plan.global_batch // cfg.gradient_accumulation_steps, seed=cfg.seed,
                             steps_per_epoch=plan.steps_per_epoch, sharding=self.batch_sharding,
                             start=start, stop=start if spent else plan.total_steps,
                             documents=self.step_kwargs["documents"])
        self._clock_start = self._now()
        clock_elapsed = self.elapsed_before  # the elapsed time every process agrees on
        window: list[dict] = []
        window_start = time.perf_counter()
        window_steps = 0
        step = start
        stopped_early = False
        with checkpoint.manager(self.mdir.checkpoints_dir, max_to_keep=cfg.save_total_limit) as mngr:
            try:
                for step, batch in loader:
                    if budget > 0:  # the schedule's position: the elapsed share of the budget
                        clock = jnp.float32(min(clock_elapsed / budget, 1.0) * plan.total_steps)
                        state, metrics = self._step(state, batch, self.rng, clock)
                    else:
                        state, metrics = self._step(state, batch, self.rng)
                    window.append(metrics)
                    window_steps += 1
                    if on_step is not None:
                        on_step(metrics)
                    done = step + 1
                    if done == start + 1:  # exclude compilation from throughput
                        jax.block_until_ready(metrics)
                        result["compile_seconds"] = time.perf_counter() - window_start
                        if progress is not None:
                            progress.message(f"compiled and ran the first step in {result['compile_seconds']:.1f} s")
                            progress.started(done)
                        window_start, window_steps = time.perf_counter(), 0
                    if budget > 0 and (not self.multi or done % STOP_CHECK_EVERY == 0):
                        clock_elapsed = self._agreed_elapsed()
                    out_of_time = budget > 0 and clock_elapsed >= budget
                    last = done == plan.total_steps or out_of_time
                    stop = stop_requested()
                    if self.multi:  # a signal to one process stops them all, at the same step
                        stop = not last and (done % STOP_CHECK_EVERY == 0 or done % cfg.logging_steps == 0) \
                            and dist.any_process(stop)
                    if progress is not None:
                        progress.step(done)
                    if done % cfg.logging_steps == 0 or done % cfg.save_steps == 0 or last or stop:
                        if window:
                            record = self._flush(window, done, window_start, window_steps, mngr)
                            window, window_steps, window_start = [], 0, time.perf_counter()
                            writer.write(record)
                            if progress is not None:
                                progress.log(record)
                            result["train"] = record
                    if self.val_store is not None and cfg.eval_steps and done % cfg.eval_steps == 0 and not last:
                        ev = self.evaluate(state.params)
                        writer.write({"step": done, **ev})
                        if progress is not None:
                            progress.message(_format_eval(done, ev))
                        window_start = time.perf_counter()
                    if done % cfg.save_steps == 0 or last or stop:
                        checkpoint.save(mngr, done, state.params, state.opt_state, self._meta(done))
                    if stop and not last:
                        stopped_early = True
                        break
                    if out_of_time:
                        say(f"The {budget:,.0f} s budget is spent at step {done:,}.")
                        break
            finally:
                loader.close()
                checkpoint.wait(mngr)
        self.elapsed_before, self._clock_start = self._elapsed(), None
        result["stopped_early"] = stopped_early
        result["final_step"] = int(jax.device_get(state.step))
        if stopped_early:
            return result
        if self.val_store is not None:
            ev = self.evaluate(state.params)
            writer.write({"step": result["final_step"], **ev})
            if progress is not None:
                progress.message(_format_eval(result["final_step"], ev))
            result["eval"] = ev
        params = jax.device_get(state.params) if jax.process_count() == 1 else _gather(state.params)
        if self.main:
            self.objective.export(self.loaded, params, self.mdir)
        result["exported"] = str(self.mdir.weights_path)
        return result

    def _agreed_elapsed(self) -> float:
        """The run's elapsed seconds, process 0's on every process (a collective when there
        are several): the learning rate and the stop must be the same everywhere."""
        if not self.multi:
            return self._elapsed()
        return float(dist.allgather_json(self._elapsed())[0])

    def _diverged(self, step: int, loss: float, lr: float, mngr) -> None:
        """Stop on inf/nan: name the step and the likely cause; no checkpoint of it is written."""
        last_good = mngr.latest_step()
        keep = (f"the last good checkpoint (step {last_good}) is kept and training resumes from it"
                if last_good is not None else "no checkpoint was written; training starts over")
        what = f"the loss became {loss}" if not math.isfinite(loss) else "the weights became inf/nan"
        clip = ", clip gradients with --max-grad-norm 1.0" if not self.cfg.max_grad_norm > 0 else ""
        raise TrainingError(
            f"training diverged at step {step}: {what}",
            f"the learning rate ({lr:.2e} at that step) is probably too high: lower --learning-rate, "
            f"raise --warmup-steps{clip}; {keep}")

    def _flush(self, window: list[dict], done: int, window_start: float, window_steps: int, mngr) -> dict:
        got = jax.device_get(window)
        loss_sum = sum(float(m["loss_sum"]) for m in got)
        denom = sum(float(m["denominator"]) for m in got)
        loss = loss_sum / max(denom, 1.0)
        if denom == 0:  # a loss of 0 over nothing: not a perfect model
            raise TrainingError(
                f"no token was chosen for prediction in steps {done - len(got) + 1}..{done}: the loss would read 0",
                f"the blocks hold only special tokens, or --mlm-probability ({self.cfg.mlm_probability}) is too "
                f"small: prepare with a larger --max-seq-length ('{self.mdir.prepare_command('--force')}')")
        for i, m in enumerate(got):  # before any checkpoint of these steps is written
            step_loss = float(m["loss_sum"]) / max(float(m["denominator"]), 1.0)
            if not (math.isfinite(step_loss) and bool(m.get("finite", True))):
                self._diverged(done - len(got) + i + 1, step_loss, float(m["learning_rate"]), mngr)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        tokens = window_steps * self.plan.tokens_per_step
        tokens_per_second = tokens / elapsed if window_steps else 0.0
        mfu = {}
        if self.plan.peak_flops:  # model-FLOPs utilisation of the devices (mlmtool.flops)
            mfu["mfu"] = tokens_per_second * self.plan.flops_per_token / (self.plan.peak_flops * self.plan.devices)
        return {
            "step": done,
            "epoch": done / self.plan.steps_per_epoch,
            "loss": loss,
            "accuracy": sum(float(m["accuracy_sum"]) for m in got) / max(denom, 1.0),
            "learning_rate": float(got[-1]["learning_rate"]),
            "grad_norm": float(got[-1]["grad_norm"]),
            "tokens_per_second": tokens_per_second,
            **mfu,
            "masked_tokens": int(denom),
            **({"mlm_probability": float(got[-1]["mlm_probability"])} if "mlm_probability" in got[-1] else {}),
            **self.objective.record(got),
            "tokens_seen": self._tokens_seen(done),
            "time": time.time(),
        }


def _gather(tree):
    """Fully replicate a (possibly sharded, multi-process) pytree and fetch it to the host."""
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _format_eval(step: int, ev: dict) -> str:
    return (f"eval @ step {step:,}: loss {ev['eval_loss']:.4f} | accuracy {ev['eval_accuracy']:.4f} | "
            f"perplexity {ev['perplexity']:.2f} | {ev['eval_tokens']:,} predicted tokens "
            f"(unigram baseline accuracy {ev['eval_unigram_baseline_accuracy']:.4f})"
            + (f" | replaced-token accuracy {ev['eval_rtd_accuracy']:.4f}" if "eval_rtd_accuracy" in ev else "")
            + (f" | minimal pairs {ev['minimal_pairs_accuracy']:.4f}" if "minimal_pairs_accuracy" in ev else ""))
