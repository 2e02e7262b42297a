"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = tuple(2**i for i in range(6, 21))


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("teacher_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.scored_tokens = Counter("teacher_scored_tokens", "completion tokens scored", registry=r)
        self.prompt_tokens = Counter("teacher_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("teacher_generated_tokens", "tokens generated", registry=r)
        self.latency = Histogram(
            "teacher_request_latency_seconds",
            "request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_sequences = Histogram(
            "teacher_batch_sequences", "sequences per forward batch", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "teacher_batch_tokens", "tokens per forward batch", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.forward_latency = Histogram(
            "teacher_forward_latency_seconds", "forward batch latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inflight_tokens = Gauge(
            "teacher_inflight_tokens", "admitted tokens not yet answered", registry=r
        )
        self.queue_jobs = Gauge(
            "teacher_queue_sequences", "sequences waiting for a forward batch", registry=r
        )
        self.queue_tokens = Gauge("teacher_queue_tokens", "tokens waiting for a forward batch", registry=r)
        self.rejected = Counter("teacher_rejected", "requests refused with 503 (queue full)", registry=r)
        self.gpu_peak = Gauge("teacher_gpu_peak_bytes", "peak GPU memory allocated by torch", registry=r)
        self.gpu_allocated = Gauge("teacher_gpu_allocated_bytes", "GPU memory allocated by torch", registry=r)
        self.ready = Gauge("teacher_ready", "1 once the model is loaded", registry=r)

    def observe_batch(self, sequences: int, tokens: int, seconds: float) -> None:
        self.batch_sequences.observe(sequences)
        self.batch_tokens.observe(tokens)
        self.forward_latency.observe(seconds)

    def render(self, backend_stats: dict[str, float]) -> bytes:
        self.queue_jobs.set(backend_stats.get("queue_jobs", 0))
        self.queue_tokens.set(backend_stats.get("queue_tokens", 0))
        self.gpu_peak.set(backend_stats.get("gpu_peak_bytes", 0))
        self.gpu_allocated.set(backend_stats.get("gpu_allocated_bytes", 0))
        return generate_latest(self.registry)
