"""``teacher-server``: serve a teacher model's log-probs over HTTP.

Examples:
  teacher-server --model Qwen/Qwen3-8B --backend vllm --port 8000
  teacher-server --model ./runs/tiny/teacher                       # transformers backend on CPU
  TEACHER_API_KEY=secret teacher-server --model ./teacher --host 0.0.0.0

Then: curl localhost:8000/v1/model ; POST /v1/score (see docs/API.md or http://HOST:PORT/docs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from teacher_server.backends import BACKENDS, backends_help
from teacher_server.config import API_KEY_ENV, ConfigError, ServerConfig

log = logging.getLogger("teacher_server")


def _engine_args(text: str) -> dict:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--engine-args must be a JSON object: {exc}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError("--engine-args must be a JSON object, e.g. '{\"seed\": 0}'")
    return doc


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig(model="-")
    p = argparse.ArgumentParser(
        prog="teacher-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="local directory or Hugging Face hub id of a causal LM")
    g.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=d.backend,
        help=backends_help(),
    )
    g.add_argument("--served-model-name", default=None, help="name reported to clients (default: --model)")
    g.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = bfloat16 on GPU, float32 on CPU",
    )
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (hf backend)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    g.add_argument(
        "--load-format",
        default=d.load_format,
        choices=["auto", "dummy"],
        help="dummy = random weights from config.json (benchmarks; like vLLM's --load-format dummy)",
    )
    g = p.add_argument_group("limits")
    g.add_argument("--max-top-k", type=int, default=d.max_top_k, help="largest top_k a request may ask")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt+completion in tokens (default: the model's maximum)",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=d.max_batch_tokens,
        help="padded tokens per forward batch (hf); bounds activation memory",
    )
    g.add_argument("--max-request-sequences", type=int, default=d.max_request_sequences)
    g.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens)
    g.add_argument("--max-candidates", type=int, default=d.max_candidates, help="K of candidate_ids")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    g.add_argument(
        "--max-queue-tokens",
        type=int,
        default=d.max_queue_tokens,
        help="tokens admitted but not answered before new requests get 503 + Retry-After",
    )
    g.add_argument(
        "--batch-window-ms",
        type=float,
        default=d.batch_window_ms,
        help="how long the micro-batcher collects requests before a forward (hf)",
    )
    g.add_argument(
        "--logits-chunk-mib",
        type=int,
        default=d.logits_chunk_mib,
        help="fp32 logits budget per row chunk (hf); lower it to save memory",
    )
    g = p.add_argument_group("vllm engine")
    g.add_argument("--tensor-parallel-size", "--tp", type=int, default=d.tensor_parallel_size)
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument(
        "--engine-args",
        type=_engine_args,
        default={},
        help="JSON object of extra vllm AsyncEngineArgs, e.g. '{\"seed\": 0}'",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="bind address (0.0.0.0 to listen on all interfaces)")
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)",
    )
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    fields = {k: v for k, v in vars(args).items() if k in ServerConfig.__dataclass_fields__}
    return ServerConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        sys.exit(f"teacher-server: {exc}")

    import uvicorn

    from teacher_server.app import create_app

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_load_failure=on_load_failure)
    settings = {k: v for k, v in config.public().items() if v not in (None, {}, False)}
    log.info("settings: %s", json.dumps(settings, default=str))
    log.info(
        "serving %s on http://%s:%d (docs: /docs, readiness: /ready)", config.name, config.host, config.port
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level, access_log=False)
    )
    server.run()
    if failed:
        sys.exit(f"teacher-server: could not load {config.model!r}: {failed[0]}")


if __name__ == "__main__":
    main()
