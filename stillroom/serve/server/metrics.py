"""Prometheus metrics of one server, kept by ``prometheus_client`` in the app's own registry.

Every series carries the served ``model`` as a label. Each app has its own ``CollectorRegistry``
(never the process-wide default), so several apps in one process (tests, load tests) count apart.
The methods are called from the event loop and from the model threads; prometheus_client's metrics
are thread-safe.

Series (``/metrics``):

- ``stillroom_requests_total{endpoint, status}``: HTTP requests by route and status code;
- ``stillroom_request_latency_seconds{endpoint}``: request to last response byte (streams too);
- ``stillroom_time_to_first_token_seconds``, ``stillroom_time_per_output_token_seconds``: LM latency
  as a user of a stream sees it;
- ``stillroom_prompt_tokens_total``, ``stillroom_generated_tokens_total``,
  ``stillroom_generated_images_total``: work done;
- ``stillroom_running_sequences``, ``stillroom_waiting_sequences``: the LM scheduler's rows running in
  the model and waiting for a place;
- ``stillroom_queue_depth``: requests queued for the model; ``stillroom_batch_size``: items (rows or
  images) per model call; ``stillroom_queue_rejections_total``: requests refused with 429 because the
  queue was full.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics; ``exposition`` renders them for ``/metrics``."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = reg = CollectorRegistry()
        self._requests = Counter(
            "stillroom_requests_total",
            "HTTP requests by endpoint and status code.",
            ["model", "endpoint", "status"],
            registry=reg,
        )
        self._latency = Histogram(
            "stillroom_request_latency_seconds",
            "Time from request to full response.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )

        def of_model(kind, name: str, doc: str, **options):  # one series: this model's
            return kind(name, doc, ["model"], registry=reg, **options).labels(model)

        self._ttft = of_model(
            Histogram,
            "stillroom_time_to_first_token_seconds",
            "LM requests: time from queueing to the first generated text.",
            buckets=TTFT_BUCKETS,
        )
        self._tpot = of_model(
            Histogram,
            "stillroom_time_per_output_token_seconds",
            "LM choices: time per generated token after the first.",
            buckets=TPOT_BUCKETS,
        )
        self._batch = of_model(
            Histogram,
            "stillroom_batch_size",
            "Items (rows or images) per model batch.",
            buckets=BATCH_BUCKETS,
        )
        self._queue = of_model(Gauge, "stillroom_queue_depth", "Requests waiting for the model.")
        self._running = of_model(Gauge, "stillroom_running_sequences", "LM rows being generated.")
        self._waiting = of_model(
            Gauge, "stillroom_waiting_sequences", "LM rows waiting for a place in the running batch."
        )
        self._prompt_tokens = of_model(Counter, "stillroom_prompt_tokens_total", "Prompt tokens processed.")
        self._tokens = of_model(Counter, "stillroom_generated_tokens_total", "Tokens generated.")
        self._images = of_model(Counter, "stillroom_generated_images_total", "Images generated.")
        self._rejected = of_model(
            Counter, "stillroom_queue_rejections_total", "Requests refused (429) because the queue was full."
        )

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP request answered (or abandoned: status 499) after ``seconds``."""
        self._requests.labels(self.model, endpoint, str(status)).inc()
        self._latency.labels(self.model, endpoint).observe(seconds)

    def batch(self, size: int) -> None:
        """The model ran a batch of ``size`` items."""
        self._batch.observe(size)

    def queue(self, delta: int) -> None:
        """``delta`` requests joined (+) or left (-) the queue."""
        self._queue.inc(delta)

    def generated(self, tokens: int = 0, images: int = 0) -> None:
        """Tokens or images produced."""
        self._tokens.inc(tokens)
        self._images.inc(images)

    def prompt_tokens(self, n: int) -> None:
        """Prompt tokens read into the model (each row's, so a prompt with ``n`` choices counts n times)."""
        self._prompt_tokens.inc(n)

    def ttft(self, seconds: float) -> None:
        """Time to first token of one LM request."""
        self._ttft.observe(seconds)

    def tpot(self, seconds: float) -> None:
        """Mean time per output token, after the first, of one LM choice."""
        self._tpot.observe(seconds)

    def running(self, n: int) -> None:
        """``n`` LM rows are being generated now."""
        self._running.set(n)

    def waiting(self, n: int) -> None:
        """``n`` LM rows are waiting for a place in the running batch now."""
        self._waiting.set(n)

    def rejected(self) -> None:
        """A request was refused because the queue was full."""
        self._rejected.inc()

    def render(self) -> str:
        """The Prometheus text format (what a scrape without an ``Accept`` header gets)."""
        return generate_latest(self.registry).decode()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type for a scrape that sent ``Accept: accept`` (text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
