"""Typed training configuration: YAML file + ``key.sub=value`` overrides, validated with fixes in the messages.

Defaults are the paper's (arXiv 2604.13016 / One-Shot-OPD README): lr 1e-6 constant, AdamW (0.9, 0.999,
wd 0.01), clip 1.0, 64 prompts per step, 1 response each, student top-k loss with k = 16, temperature 1.0,
top-p 1.0, max response 7,680 tokens, token-mean aggregation, strictly on-policy (one update per batch).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from student_trainer.errors import ConfigError
from student_trainer.evaluate.run import EvalConfig as EvalSettings
from student_trainer.opd.loss_table import LOSSES, loss_spec
from student_trainer.rollout import ENGINES

# teacher.protocol -> the teacher capabilities (shared.protocol.Capabilities fields) a teacher speaking it can
# provide; None: whatever each server reports in /v1/model (checked at connect by teacher.compat). A stock
# OpenAI server's prompt_logprobs are the log-probs of the sequence's own tokens and the top-k of the raw
# (temperature 1) logits, nothing else (docs/TRAINING.md, "A stock vLLM server as the teacher").
TEACHER_PROTOCOLS: dict[str, frozenset[str] | None] = {"opd": None, "openai": frozenset()}


@dataclass
class ModelConfig:
    student: str = ""  # local dir or hub id
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # LoRA adapters instead of all weights (peft): {r, alpha, dropout, target_modules}; unset = full training
    lora: dict[str, Any] | None = None


@dataclass
class TeacherConfig:
    urls: list[str] = field(default_factory=list)  # one or more teacher-server endpoints
    local: str | None = None  # in-process teacher model (required by the full_vocab loss)
    api_key: str | None = None  # default: $TEACHER_API_KEY
    timeout_s: float = 300.0
    max_retry_wait_s: float = 600.0  # keep retrying a dead teacher this long before failing the step
    max_sequences_per_request: int = 64
    allow_tokenizer_mismatch: bool = False
    # opd: teacher-server's /v1/score | openai: a stock vLLM OpenAI server's /v1/completions (prompt_logprobs)
    protocol: str = "opd"


@dataclass
class DataConfig:
    path: str = ""  # JSONL / parquet / a datasets directory or Hub name
    split: str = "train"  # the split of a datasets source (a file is one split)
    subset: str | None = None  # the configuration of a Hub dataset with several (e.g. gsm8k: main)
    question_field: str = "question"
    answer_field: str | None = None
    student_template: str = "chat"  # "chat" (student's chat template) or a string containing {question}
    system_prompt: str | None = None
    teacher_prompt: str = (
        "same"  # "same" | "chat" (teacher's own template, server-side) | a {question} string
    )
    seed: int = 0
    # extra keyword arguments of apply_chat_template for the student's and a chat teacher's prompt
    # (e.g. {enable_thinking: false} for Qwen3)
    chat_template_kwargs: dict[str, Any] | None = None


@dataclass
class RolloutConfig:
    engine: str = "hf"  # a name in student_trainer.rollout.ENGINES
    n: int = 1  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 7680
    static_cache: bool = False  # transformers static cache (faster on GPU)
    shadow_dtype: str | None = None  # hf engine: generate from a bfloat16 copy of fp32 master weights
    topk_source: str = "engine"  # where S_t comes from: engine (its sampler) | trainer (a no-grad forward)
    vllm_gpu_memory_utilization: float = 0.3  # vllm engine: its share of the device memory
    vllm_kv_cache_gib: float | None = None  # vllm engine: an explicit KV cache size instead of the share
    vllm_max_model_len: int | None = None  # vllm engine: prompt + completion limit (default: the model's)
    vllm_sleep: bool = True  # vllm engine on GPU: free its KV cache (sleep) during the training phase


@dataclass
class LossConfig:
    type: str = "student_topk"  # a name in student_trainer.opd.loss_table.LOSSES
    top_k: int = 16
    topk_form: str = "paper"  # paper (code semantics) | direct (renormalised, differentiable form)
    chunk_rows: int = 1024  # rows of [tokens, vocab] logits materialised at once
    allow_biased_sampling: bool = False  # accept rollout.top_p < 1 (the OPD gradient is then biased)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 64  # global, across processes
    micro_batch_prompts: int = 8  # per process and forward; gradient accumulation covers the rest
    seed: int = 0
    output_dir: str = "runs/opd"
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    sample_every: int = 10  # print a decoded rollout this often (0 = never)
    overlap_scoring: bool = True  # score micro-batch i while generating i+1 (False: wait right away)
    merge_lora: bool = False  # model.lora: save the merged model at the end (default: the adapter); --merge
    push_to_hub: bool = False  # upload the final output directory to the Hugging Face Hub
    hub_model_id: str | None = None  # the Hub repo for push_to_hub (required with it)
    hub_private: bool = True


@dataclass(frozen=True)
class EvalConfig(EvalSettings):
    """Held-out eval during training: what and how often, plus the sampling settings of ``student-trainer
    eval`` (inherited: one definition, ``evaluate.EvalConfig``), greedy by default here."""

    greedy: bool = True
    data: str | None = None  # held-out problems (JSONL) with reference answers
    every: int = 0  # 0 = never during training
    question_field: str = "question"
    answer_field: str = "answer"
    limit: int | None = None

    def settings(self, data: DataConfig) -> EvalSettings:
        """The ``evaluate`` settings. The prompt is the student's own (``data.student_template`` and
        ``data.system_prompt``) unless ``eval.template`` is set."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(EvalSettings)}
        if self.template is None and data.student_template != "chat":
            own.update(template=data.student_template, system_prompt=None)
        elif self.template is None and self.system_prompt is None:
            own["system_prompt"] = data.system_prompt
        return EvalSettings(**own)


@dataclass
class LoggingConfig:
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard / wandb when installed
    project: str = "opd"
    plot: bool = True
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and how to fix it."""
        m, t, d, r, lo, o, tr = (
            self.model,
            self.teacher,
            self.data,
            self.rollout,
            self.loss,
            self.optim,
            self.train,
        )
        spec = loss_spec(lo.type)
        _check(
            t.protocol in TEACHER_PROTOCOLS,
            f"teacher.protocol={t.protocol!r} is unknown; choose one of {', '.join(TEACHER_PROTOCOLS)}",
        )
        refusal = protocol_refusal(t.protocol, lo.type, r.temperature)
        _check(refusal is None, refusal or "")
        _check(
            t.protocol == "opd" or not t.local,
            f"teacher.protocol={t.protocol} says how to talk to teacher.urls, but teacher.local={t.local!r} is "
            "an in-process teacher: unset teacher.local or set teacher.protocol=opd",
        )
        _check(lo.topk_form in ("paper", "direct"), f"loss.topk_form={lo.topk_form!r}: use paper or direct")
        _check(lo.top_k >= spec.min_top_k, f"loss.top_k={lo.top_k} must be >= {spec.min_top_k} for {lo.type}")
        _check(lo.chunk_rows >= 1, f"loss.chunk_rows={lo.chunk_rows} must be >= 1")
        _check(
            m.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"model.dtype={m.dtype!r}: use auto, float32 or bfloat16",
        )
        _check_lora(m.lora)
        _check(
            not tr.merge_lora or m.lora is not None,
            "train.merge_lora (--merge) merges LoRA adapters into the saved model, but model.lora is unset "
            "(full training saves the whole model anyway): unset train.merge_lora or set model.lora",
        )
        _check(
            not tr.push_to_hub or bool(tr.hub_model_id),
            "train.push_to_hub=true needs train.hub_model_id (e.g. your-name/qwen3-1.7b-opd)",
        )
        _check(
            d.chat_template_kwargs is None or all(isinstance(k, str) for k in d.chat_template_kwargs),
            f"data.chat_template_kwargs={d.chat_template_kwargs!r} must map names to values",
        )
        if spec.local_teacher:
            _check(
                bool(t.local),
                f"loss.type={lo.type} needs the teacher's whole distribution: set teacher.local "
                "to a local teacher model directory (an HTTP teacher sends only top-k)",
            )
        _check(
            r.engine in ENGINES, f"rollout.engine={r.engine!r} is unknown; choose one of {', '.join(ENGINES)}"
        )
        _check(r.temperature > 0, f"rollout.temperature={r.temperature} must be > 0 (on-policy sampling)")
        _check(0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]")
        _check(
            r.top_p == 1 or lo.allow_biased_sampling,
            f"rollout.top_p={r.top_p} truncates the sampling distribution, but loss.type={lo.type} is the "
            "gradient of the KL of the untruncated (tempered) distribution: with truncated samples it is "
            "biased (measured: 18% off the KL gradient at top-p 0.9; docs/OPD.md, 'Temperature, top-p and "
            "padded rows'); set rollout.top_p=1.0, or loss.allow_biased_sampling=true to accept the bias",
        )
        _check(
            r.n >= 1 and r.max_new_tokens >= 1,
            f"rollout.n={r.n} and max_new_tokens={r.max_new_tokens} must be >= 1",
        )
        _check(
            r.shadow_dtype in (None, "bfloat16", "float16", "float32"),
            f"rollout.shadow_dtype={r.shadow_dtype!r}: use bfloat16 (float16, or float32 for tests), or unset it",
        )
        _check(
            r.shadow_dtype is None or r.engine == "hf",
            f"rollout.shadow_dtype={r.shadow_dtype} is an option of the hf engine, not of rollout.engine="
            f"{r.engine} (which keeps its own copy of the weights): unset rollout.shadow_dtype",
        )
        _check(
            r.topk_source in ("engine", "trainer"),
            f"rollout.topk_source={r.topk_source!r}: use engine (the sampler's record) or trainer (a no-grad "
            "forward of the training model)",
        )
        _check(
            0 < r.vllm_gpu_memory_utilization <= 1,
            f"rollout.vllm_gpu_memory_utilization={r.vllm_gpu_memory_utilization} must be in (0, 1]",
        )
        _check(
            r.vllm_kv_cache_gib is None or r.vllm_kv_cache_gib > 0,
            f"rollout.vllm_kv_cache_gib={r.vllm_kv_cache_gib} must be > 0 (or unset: use the memory share)",
        )
        _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
        _check(
            o.schedule in ("constant", "linear", "cosine"),
            f"optim.schedule={o.schedule!r}: use constant, linear or cosine",
        )
        _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
        _check(tr.steps >= 1, f"train.steps={tr.steps} must be >= 1")
        _check(
            tr.prompts_per_step >= 1 and tr.micro_batch_prompts >= 1,
            f"train.prompts_per_step={tr.prompts_per_step} and micro_batch_prompts={tr.micro_batch_prompts} "
            "must be >= 1",
        )
        _check(tr.save_every >= 0 and tr.log_every >= 1, "train.save_every must be >= 0 and log_every >= 1")
        _check(
            d.student_template == "chat" or "{question}" in d.student_template,
            f"data.student_template={d.student_template!r} must be 'chat' or contain {{question}}",
        )
        _check(
            d.teacher_prompt in ("same", "chat") or "{question}" in d.teacher_prompt,
            f"data.teacher_prompt={d.teacher_prompt!r} must be 'same', 'chat' or contain {{question}}",
        )

    def check_runnable(self) -> None:
        """Checks that need values a config file may leave for the command line."""
        _check(
            bool(self.model.student),
            "model.student is empty: set it to the student model directory or hub id",
        )
        _check(
            bool(self.teacher.urls) or bool(self.teacher.local),
            "no teacher: set teacher.urls (e.g. [http://localhost:8000]) or teacher.local (a model directory)",
        )
        _check(
            bool(self.data.path),
            "data.path is empty: set it to a JSONL/parquet prompt file or a dataset name",
        )

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        if doc["teacher"]["api_key"]:
            doc["teacher"]["api_key"] = "***"
        return doc

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def protocol_refusal(protocol: str, loss_type: str, temperature: float) -> str | None:
    """Why a teacher speaking ``protocol`` cannot serve ``loss_type`` at ``rollout.temperature``; None if it can.

    Reads :data:`TEACHER_PROTOCOLS` and the loss table (``LossSpec.needs``), so a protocol or a loss is one
    row there; an opd teacher's capabilities are only known from its ``/v1/model`` (``teacher.compat``).
    """
    caps = TEACHER_PROTOCOLS.get(protocol)
    if caps is None:
        return None
    spec = loss_spec(loss_type)
    missing = [need for need in spec.needs if need not in caps]
    if spec.local_teacher or missing:
        works = [name for name, s in LOSSES.items() if not s.local_teacher and set(s.needs) <= caps]
        why = "the teacher's whole distribution" if spec.local_teacher else "capability " + ", ".join(missing)
        fix = "an in-process teacher (teacher.local)" if spec.local_teacher else "teacher-server (hf backend)"
        return (
            f"loss.type={loss_type} needs {why}, which a teacher.protocol={protocol} server does not return "
            f"(its prompt_logprobs carry only each token's log-prob and the top-k); with teacher.protocol="
            f"{protocol} use loss.type={' or '.join(works)}, or keep {loss_type} with teacher.protocol=opd and "
            f"{fix}"
        )
    if temperature != 1.0 and "temperature" not in caps:
        return (
            f"rollout.temperature={temperature} with teacher.protocol={protocol}: vLLM's prompt_logprobs are "
            "log_softmax of the raw logits (the request's temperature does not apply to them), but the loss "
            "must compare the tempered distributions the tokens were sampled from; set rollout.temperature=1.0, "
            "or use teacher.protocol=opd with a teacher-server on the hf backend, which scores at the rollout "
            "temperature"
        )
    return None


LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def lora_settings(lora: dict[str, Any]) -> dict[str, Any]:
    """``model.lora`` with its defaults filled in (r 16, alpha 32, dropout 0, every linear layer but the head)."""
    return {**LORA_DEFAULTS, **lora}


def _check_lora(lora: dict[str, Any] | None) -> None:
    if lora is None:
        return
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    _check(not unknown, f"model.lora has unknown key(s) {unknown}; valid keys: {', '.join(LORA_DEFAULTS)}")
    s = lora_settings(lora)
    r, alpha, dropout, targets = s["r"], s["alpha"], s["dropout"], s["target_modules"]
    _check(
        isinstance(r, int) and not isinstance(r, bool) and r >= 1,
        f"model.lora.r={r!r} must be an integer >= 1 (the adapter rank, e.g. 16; tinker's OPD recipe: 128)",
    )
    _check(
        isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0,
        f"model.lora.alpha={alpha!r} must be a number > 0 (the update is scaled by alpha / r)",
    )
    _check(
        isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
        f"model.lora.dropout={dropout!r} must be in [0, 1)",
    )
    _check(
        targets == "all-linear"
        or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)),
        f"model.lora.target_modules={targets!r} must be 'all-linear' or a list of module names "
        "(e.g. [q_proj, k_proj, v_proj, o_proj])",
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _coerce(value: Any, target: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, with an error naming the key.

    Note YAML reads ``1e-6`` (no dot) as a string; floats are therefore parsed with ``float()``.
    """
    origin = getattr(target, "__origin__", None)
    if isinstance(value, str) and target is not str:
        if target is float:
            try:
                return float(value)
            except ValueError:
                return _bad(key, value, target)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return _bad(key, value, target)
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if target is float and is_num:
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is bool and isinstance(value, bool):
        return value
    if target is str and isinstance(value, str):
        return value
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is list:
        return (
            [value]
            if isinstance(value, str)
            else list(value)
            if isinstance(value, (list, tuple))
            else _bad(key, value, target)
        )
    return _bad(key, value, target)


def _bad(key: str, value: Any, target: Any) -> Any:
    name = getattr(target, "__name__", str(target))
    raise ConfigError(f"{key}={value!r} should be of type {name}")


def _field_types(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def from_dict(doc: dict[str, Any]) -> Config:
    """Build a Config from nested dicts; unknown sections or keys are errors that list the valid ones."""
    sections = {}
    hints = _field_types(Config)
    for name, value in (doc or {}).items():
        if name not in hints:
            raise ConfigError(f"unknown config section {name!r}; valid sections: {', '.join(hints)}")
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
        cls = hints[name]
        fields = _field_types(cls)
        kwargs = {}
        for key, v in value.items():
            if key not in fields:
                raise ConfigError(f"unknown key {name}.{key}; valid keys: {', '.join(fields)}")
            kwargs[key] = _coerce(v, _unoptional(fields[key]), f"{name}.{key}") if v is not None else None
        try:
            sections[name] = cls(**kwargs)
        except ConfigError as exc:  # a section's own check (eval's messages start with the field name)
            raise ConfigError(f"{name}.{exc}") from None
    return Config(**sections)


def _unoptional(tp: Any) -> Any:
    args = getattr(tp, "__args__", ())
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "teacher.urls=[http://a:8000]"]`` applied onto a nested dict."""
    doc = json.loads(json.dumps(doc or {}))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=10)")
        path, value = item.split("=", 1)
        section, key = path.split(".", 1)
        doc.setdefault(section, {})[key] = value
    return doc


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + overrides -> validated Config."""
    doc: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    return from_dict(apply_overrides(doc, overrides or []))
