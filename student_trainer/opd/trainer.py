"""The OPD training loop (accelerate): on-policy rollouts -> teacher scores -> OPD loss -> one update.

Per step, on each process: take this process's share of the step's prompts, and for each micro-batch
generate rollouts from the current student and send them to the teacher at once (an async client on its own
thread), so the teacher scores micro-batch i while micro-batch i+1 is generated. Then forward/backward each
micro-batch as its scores arrive (gradients accumulate; the loss is the token mean over the whole step across
processes), clip, and take exactly ONE optimizer step: the student-top-k loss is strictly on-policy
(docs/OPD.md, section 4 "Strictly on-policy"), and ``losses.assert_on_policy`` enforces it. The step's
pieces are the typed functions of :mod:`student_trainer.opd.step`, which the probe and the pre-flight call.

A dead teacher is retried with backoff inside the client until ``teacher.max_retry_wait_s``; the step waits
and continues, so no step is lost or repeated. Checkpoints hold model, optimizer, scheduler, RNG and data
position; ``resume`` continues exactly (rollouts are seeded per (seed, step, process, micro-batch)).

Several processes: DDP, FSDP2 or DeepSpeed ZeRO, as the accelerate launch says (``opd.distributed``; the
start line prints which, and the precision); a LoRA student (``model.lora``) trains peft adapters
(``opd.lora``). docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from shared.fingerprint import tokenizer_fingerprint
from student_trainer.config import Config
from student_trainer.opd import checkpoint
from student_trainer.opd.batch import build_batch
from student_trainer.opd.distributed import (
    PARAM_SHARDING,
    build_accelerator,
    prepare_head,
    setup_line,
    shard_line,
    sharding,
    unwrap_state_dict,
)
from student_trainer.opd.loss_table import loss_spec
from student_trainer.opd.optim import build_optimizer, build_scheduler
from student_trainer.opd.policy import HiddenStatesLM, load_causal_lm
from student_trainer.opd.step import MicroBatch, forward, rollout_phase, split_micro
from student_trainer.tracking import JsonlLog, available_trackers, plot_metrics, summary_line


class OPDTrainer:
    """``OPDTrainer(cfg).train()``; every heavy thing is built in ``__init__`` (models, client, data)."""

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        from accelerate.utils import set_seed

        cfg.check_runnable()
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        trackers = available_trackers(cfg.logging.trackers)
        self.acc = build_accelerator(
            cfg.model.dtype, cfg.optim.grad_clip, log_with=trackers or None, project_dir=str(self.out)
        )
        set_seed(cfg.train.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        weights_dtype = torch.float32 if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
        model, self.tokenizer = load_causal_lm(
            cfg.model.student, weights_dtype, cfg.model.gradient_checkpointing, cfg.model.trust_remote_code
        )
        if cfg.model.lora is not None:
            from student_trainer.config import lora_settings
            from student_trainer.opd.lora import apply_lora

            settings = lora_settings(cfg.model.lora)
            model = apply_lora(model, settings)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            self.acc.print(f"LoRA {settings}: {trainable:,} of {total:,} parameters train")
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.loss = loss_spec(cfg.loss.type)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._setup_teacher()
        self._setup_data()
        policy = HiddenStatesLM(model)
        self.sharding = sharding(self.acc)  # none | fsdp2 | zero1-3, fixed by the launch
        self._param_sharded = self.sharding in PARAM_SHARDING
        self.engine = None
        if self._param_sharded:
            self._build_engine(model)
        optimizer = build_optimizer(policy, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
        self.policy, self.optimizer = self.acc.prepare(policy, optimizer)
        # on the prepared optimizer: ZeRO regroups the parameters the scheduler's groups must follow
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps
        )
        prepare_head(self.acc, self.policy)
        self._deepspeed = self.sharding.startswith("zero")
        self.acc.register_for_checkpointing(self.scheduler)
        self.acc.print(setup_line(self.acc, self.policy))
        if self.sharding != "none":
            print(shard_line(self.acc, self.policy), flush=True)  # every process: its own share
        self._setup_rollouts()
        self.start_step = self._maybe_resume() if resume else 0
        self._setup_logging(trackers)

    # ------------------------------------------------------------------------------------------- setup
    def _setup_teacher(self) -> None:
        from student_trainer.teacher.connect import connect_teacher

        self.teacher = connect_teacher(
            self.cfg,
            self.fingerprint,
            self.acc.device,
            warn=self.acc.print,
            student_vocab_size=len(self.tokenizer),
            student_tokenizer=self.tokenizer,
        )
        caps = self.teacher.capabilities
        self.acc.print(
            f"teacher: {self.teacher.description}; tokenizer {self.fingerprint} matches; capabilities {caps}"
        )

    def _setup_data(self) -> None:
        from student_trainer.data.prompts import PromptRenderer, PromptStream, PromptTemplates, load_prompts

        d = self.cfg.data
        table = load_prompts(
            d.path,
            question_field=d.question_field,
            answer_field=d.answer_field,
            split=d.split,
            subset=d.subset,
        )
        templates = PromptTemplates(
            student=d.student_template,
            teacher=d.teacher_prompt,
            system_prompt=d.system_prompt,
            chat_template_kwargs=d.chat_template_kwargs or {},
        )
        self.stream = PromptStream(table, PromptRenderer(self.tokenizer, templates), seed=d.seed)
        self.eval_problems = None
        if self.cfg.eval.data and self.cfg.eval.every:
            from student_trainer.evaluate import load_problems

            e = self.cfg.eval
            self.eval_problems = load_problems(
                e.data, question_field=e.question_field, answer_field=e.answer_field, limit=e.limit
            )

    def _build_engine(self, causal_lm: torch.nn.Module) -> None:
        """The rollout engine. Under parameter sharding (FSDP2, ZeRO-3) no process holds the whole model, so
        it is built from the unsharded model before ``prepare`` and the hf engine samples from its own whole
        copy (a shadow in ``rollout.shadow_dtype``, default the weights' dtype) that every sync refreshes
        from the gathered parameters."""
        from student_trainer.rollout import build_rollout_engine

        r = self.cfg.rollout
        if self._param_sharded and r.engine == "hf" and r.shadow_dtype is None:
            r.shadow_dtype = str(next(causal_lm.parameters()).dtype).removeprefix("torch.")
            self.acc.print(
                f"rollouts: the student is sharded ({self.sharding}); the hf engine samples from a whole "
                f"copy (rollout.shadow_dtype={r.shadow_dtype}; set rollout.shadow_dtype=bfloat16 to halve it)"
            )
        self.engine = build_rollout_engine(self.cfg, causal_lm, self.tokenizer, self.acc)

    def _setup_rollouts(self) -> None:
        if self.engine is None:
            self._build_engine(self.acc.unwrap_model(self.policy).causal_lm)
        self._rescore = None
        if self.cfg.rollout.topk_source == "trainer":
            from functools import partial

            from student_trainer.opd.engine_gap import trainer_topk

            self._rescore = partial(
                trainer_topk,
                self.policy,
                pad_id=self.pad_id,
                device=self.acc.device,
                temperature=self.cfg.rollout.temperature,
                vocab_size=len(self.tokenizer),
                chunk_rows=self.cfg.loss.chunk_rows,
            )
        r = self.cfg.rollout
        self.acc.print(
            f"rollouts: engine {r.engine} ({type(self.engine).__name__}), student top-k from {r.topk_source}"
        )

    def _maybe_resume(self) -> int:
        last = checkpoint.latest_checkpoint(self.out)
        if last is None:
            self.acc.print(f"resume: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            return 0
        state = checkpoint.load(self.acc, last)
        self.stream.load_state_dict(state["data_position"])
        # an engine holding its own copy of the weights (vllm, shadow) must sample the resumed ones
        self.engine.sync_weights(self.acc.unwrap_model(self.policy).causal_lm)
        self.engine.policy_version = state["step"]
        self.acc.print(f"resumed from {last} (step {state['step']})")
        return int(state["step"])

    def _setup_logging(self, trackers: list[str]) -> None:
        self.log = (
            JsonlLog(self.out / "metrics.jsonl", resume_step=self.start_step + 1)
            if self.acc.is_main_process
            else None
        )
        if self.acc.is_main_process:
            self.cfg.dump(self.out / "config.yaml")
            lines = [
                f"  {name}: " + ", ".join(f"{k}={v}" for k, v in section.items())
                for name, section in self.cfg.to_dict().items()
            ]
            self.acc.print(f"resolved config (saved to {self.out / 'config.yaml'}):\n" + "\n".join(lines))
        if trackers:
            self.acc.init_trackers(self.cfg.logging.project, config=_flat(self.cfg.to_dict()))

    # -------------------------------------------------------------------------------------------- loop
    def train(self) -> Path:
        tc = self.cfg.train
        bar = self._progress()
        for step in range(self.start_step, tc.steps):
            metrics = self.train_step(step)
            if self.eval_problems is not None and (step + 1) % self.cfg.eval.every == 0:
                metrics.update(self.evaluate())
            if self.log is not None:
                self.log.write(metrics)
            self.acc.log(metrics, step=step + 1)
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                line = summary_line(step + 1, tc.steps, metrics)
                bar.write(line) if bar else self.acc.print(line)
            if bar:
                bar.update(1)
            if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < tc.steps:
                checkpoint.save(
                    self.acc,
                    self.out,
                    step + 1,
                    {"data_position": self.stream.state_dict()},
                    tc.keep_checkpoints,
                )
        if bar:
            bar.close()
        return self._finish()

    def train_step(self, step: int) -> dict[str, Any]:
        """One on-policy step; returns the step's metrics (identical on every process)."""
        t0 = time.perf_counter()
        tc = self.cfg.train
        world, rank = self.acc.num_processes, self.acc.process_index
        prompts = self.stream.take(tc.prompts_per_step)[rank::world]
        micro = split_micro(prompts, tc.micro_batch_prompts)
        batches, times = rollout_phase(
            self.engine,
            self.teacher,
            micro,
            self.cfg,
            step=step,
            rank=rank,
            autocast=self.acc.autocast,
            rescore=self._rescore,
            world=world,
        )
        self.engine.sleep()  # vllm on CUDA: its KV cache and weights make room for the training phase
        local_tokens = sum(mb.num_tokens for mb in batches)
        step_tokens = float(self.acc.reduce(torch.tensor(float(local_tokens), device=self.acc.device), "sum"))
        totals, loss_sum = self._train_phase(batches, step_tokens, times)
        o0 = time.perf_counter()
        clip = self.cfg.optim.grad_clip
        grad_norm = self.acc.clip_grad_norm_(self.policy.parameters(), clip) if clip else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - o0
        s0 = time.perf_counter()
        self.engine.sync_weights(self.acc.unwrap_model(self.policy).causal_lm)
        times["weight_sync"] = time.perf_counter() - s0
        times["step"] = time.perf_counter() - t0
        samples = [s for mb in batches for s in mb.rollouts.samples]
        return self._step_metrics(step, totals, loss_sum, samples, step_tokens, grad_norm, times)

    def _train_phase(self, batches: list[MicroBatch], step_tokens: float, times: dict[str, float]):
        """Forward/backward of each micro-batch as its scores arrive; gradients accumulate."""
        totals, loss_sum, fb = None, 0.0, 0.0
        for i, mb in enumerate(batches):
            w0 = time.perf_counter()
            scores = mb.pending.result()
            times["teacher_wait"] += time.perf_counter() - w0
            f0 = time.perf_counter()
            loss, part = self._micro_step(mb, scores, step_tokens, last=i == len(batches) - 1)
            fb += time.perf_counter() - f0
            loss_sum += float(loss)
            totals = part if totals is None else totals + part
        times["forward_backward"] = fb
        return totals, loss_sum

    def _micro_step(self, mb: MicroBatch, scores, step_tokens: float, last: bool):
        from student_trainer.opd.losses import assert_on_policy

        assert_on_policy(mb.rollouts.policy_version, self.engine.policy_version)
        batch = build_batch(mb.rollouts.samples, scores.scores, self.pad_id, self.acc.device, self.loss)
        ctx = nullcontext() if last else self.acc.no_sync(self.policy)
        if self._deepspeed:  # DeepSpeed steps its optimizer inside backward, at the boundary only
            self.acc.sync_gradients = last
        with ctx, self.acc.autocast():
            # normalizer: the whole step's tokens over all processes; DDP averages grads, hence * world
            loss, totals = forward(
                self.policy,
                batch,
                self.cfg.loss,
                self.loss,
                step_tokens / self.acc.num_processes,
                teacher_logits=scores.logits,
                vocab_size=len(self.tokenizer),
                temperature=self.cfg.rollout.temperature,
            )
            self.acc.backward(loss)
        return loss.detach() / self.acc.num_processes, totals

    # ----------------------------------------------------------------------------------------- metrics
    def _step_metrics(self, step, totals, loss_sum, samples, step_tokens, grad_norm, times) -> dict[str, Any]:
        acc = self.acc
        sums = acc.reduce(totals.sums_M.to(acc.device), "sum")
        counts = acc.reduce(totals.counts_M.to(acc.device), "sum")
        opd = {
            n: s / c for n, s, c in zip(totals.names, sums.tolist(), counts.tolist(), strict=True) if c > 0
        }
        if totals.peaks_P is not None:
            peaks = acc.gather(totals.peaks_P.to(acc.device)[None]).amax(0)
            opd.update(zip(totals.peak_names, peaks.tolist(), strict=True))
        local = torch.tensor(
            [
                loss_sum,
                float(len(samples)),
                float(sum(s.finished for s in samples)),
                times["teacher_wait"],
                times["step"],
            ],
            device=acc.device,
            dtype=torch.float64,
        )
        loss_g, n_samples, n_eos, wait_g, step_g = acc.reduce(local, "sum").tolist()
        m: dict[str, Any] = {
            "step": step + 1,
            "opd/loss": loss_g,
            "opd/reverse_kl": opd.get("opd/reverse_kl_k1"),
            **opd,
            "rollout/response_length": step_tokens / max(1.0, n_samples),
            "rollout/eos_rate": n_eos / max(1.0, n_samples),
            "rollout/tokens": step_tokens,
            "rollout/weight_sync_s": self.engine.last_sync_s,
            "optim/lr": self.scheduler.get_last_lr()[0],
            "optim/grad_norm": None if grad_norm is None else float(grad_norm),
            "time/tokens_per_s": step_tokens / times["step"],
            "time/teacher_wait_share": wait_g / max(step_g, 1e-9),
            **{f"time/{k}_s": v for k, v in times.items()},
        }
        m.update(self.teacher.stats())
        if torch.cuda.is_available():
            m["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            m["memory/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if self.cfg.train.sample_every and (step + 1) % self.cfg.train.sample_every == 0 and samples:
            self.acc.print("sample: " + repr(self.tokenizer.decode(samples[0].completion_ids.tolist())[:300]))
        return m

    def evaluate(self) -> dict[str, float]:
        """Accuracy of the current student on the held-out problems (``eval.every`` steps)."""
        from student_trainer.evaluate import evaluate

        ecfg = self.cfg.eval.settings(self.cfg.data)
        model = self.acc.unwrap_model(self.policy).causal_lm
        with self.acc.autocast():
            report = evaluate(model, self.tokenizer, self.eval_problems, ecfg)
        return {"eval/accuracy": report.summary.accuracy, "eval/eos_rate": report.summary.eos_rate}

    # ------------------------------------------------------------------------------------------ finish
    def _progress(self):
        if not (self.cfg.logging.progress_bar and self.acc.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.start_step, desc="opd", unit="step", leave=False)

    def _finish(self) -> Path:
        self.acc.wait_for_everyone()
        state_dict = unwrap_state_dict(self.acc, self.policy) if self.sharding != "none" else None
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.policy).causal_lm
            if self.cfg.model.lora is not None:  # the adapter, or the merged model with --merge
                from student_trainer.opd.lora import save_final

                save_final(model, self.tokenizer, self.out, merge=self.cfg.train.merge_lora)
            else:
                model.save_pretrained(self.out, state_dict=state_dict)
                self.tokenizer.save_pretrained(self.out)
            if self.cfg.logging.plot:
                png = plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png", title="OPD")
                if png:
                    self.acc.print(f"plot: {png}")
            self.acc.print(f"saved the student to {self.out}")
            if self.cfg.train.push_to_hub:
                from student_trainer.hub import push_output

                push_output(
                    self.out,
                    self.cfg.train.hub_model_id,
                    self.cfg.train.hub_private,
                    commit_message=f"OPD: {self.cfg.train.steps} steps, loss {self.cfg.loss.type} (opd-distill)",
                )
        self.acc.wait_for_everyone()
        self.engine.close()
        self.acc.end_training()
        self.teacher.close()
        return self.out


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
