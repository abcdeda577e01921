"""The service's Prometheus metrics, and the ASGI middleware that counts responses by route and status."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .scheduler import Scheduler


class Metrics:
    """In a registry of its own (several apps may share a process in tests)."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cohere_deploy_requests", "HTTP requests by route template and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("cohere_deploy_prompt_tokens", "Prompt tokens of accepted requests",
                                     registry=r)
        self.completion_tokens = Counter("cohere_deploy_completion_tokens",
                                         "Generated tokens (cancelled requests included)", registry=r)
        self.time_to_first_token = Histogram(
            "cohere_deploy_time_to_first_token_seconds", "From a request's arrival to its first token (finished "
            "requests)", registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        queue_depth = Gauge("cohere_deploy_queue_depth", "Requests waiting for a batch row", registry=r)
        queue_depth.set_function(lambda: scheduler.waiting)
        active = Gauge("cohere_deploy_active_requests", "Requests in a batch row", registry=r)
        active.set_function(lambda: scheduler.active)
        cancelled = Gauge("cohere_deploy_cancelled_requests", "Requests cancelled because their client went away "
                          "(since start)", registry=r)
        cancelled.set_function(lambda: scheduler.cancelled_total)
        cache = scheduler.generator.prefix_cache
        if cache is not None:  # vLLM's prefix cache metrics: queried and hit prompt tokens
            for name, what, read in (
                    ("queried_tokens", "Prompt tokens looked up in the prefix cache (since start)",
                     lambda: cache.stats().queried_tokens),
                    ("hit_tokens", "Prompt tokens whose KV came from the prefix cache instead of a prefill "
                     "(since start)", lambda: cache.stats().hit_tokens),
                    ("hit_rate", "hit_tokens / queried_tokens", lambda: cache.stats().hit_rate),
                    ("entries", "Blocks in the prefix cache", lambda: cache.stats().entries),
                    ("bytes", "Device memory the prefix cache's blocks hold", lambda: cache.stats().bytes),
                    ("evictions", "Blocks evicted from the prefix cache, least recently used first (since start)",
                     lambda: cache.stats().evictions)):
                Gauge(f"cohere_deploy_prefix_cache_{name}", what, registry=r).set_function(read)


def route_label(scope: dict) -> str:
    """The template of the route that served a request (``/v1/models/{name:path}``), as vLLM and
    prometheus-fastapi-instrumentator label: a label per URL would let any client grow the metric without bound.
    Paths no route matches share one label."""
    route = scope.get("route")  # set by the router on the scope it was handed (a match or a method mismatch)
    return getattr(route, "path", None) or "other"


class CountRequests:
    """ASGI middleware counting responses by route and status (a plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware would sit between streaming responses and their client's disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets when the app fails before answering

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(route_label(scope), str(status)).inc()
