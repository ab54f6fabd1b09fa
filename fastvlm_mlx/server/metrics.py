"""Prometheus metrics of the server: request counts, token counts, latency histograms, memory gauges."""

import os
import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Prometheus counters and histograms, written in the text exposition format (gauges are passed in)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}
        self.cancelled_requests = 0  # ended by the client (it went away, or pressed stop) before their answer
        self.tokens = {"prompt": 0, "cached": 0, "generated": 0}
        self.hist = {
            "ttft_seconds": ([0] * (len(TTFT_BUCKETS) + 1), [0.0], TTFT_BUCKETS),
            "request_latency_seconds": ([0] * (len(LATENCY_BUCKETS) + 1), [0.0], LATENCY_BUCKETS),
        }

    def count(self, status: int) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def cancelled(self) -> None:
        with self.lock:
            self.cancelled_requests += 1

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            counts, total, buckets = self.hist[name]
            counts[next((i for i, b in enumerate(buckets) if value <= b), len(buckets))] += 1
            total[0] += value

    def add_tokens(self, prompt: int, cached: int, generated: int) -> None:
        with self.lock:
            self.tokens["prompt"] += prompt
            self.tokens["cached"] += cached
            self.tokens["generated"] += generated

    def render(self, gauges: dict) -> str:
        with self.lock:
            lines = ["# TYPE fastvlm_requests_total counter"]
            lines += [f'fastvlm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# TYPE fastvlm_requests_cancelled_total counter",
                      f"fastvlm_requests_cancelled_total {self.cancelled_requests}"]  # fmt: skip
            for kind, n in self.tokens.items():
                lines += [f"# TYPE fastvlm_{kind}_tokens_total counter", f"fastvlm_{kind}_tokens_total {n}"]
            for name, (counts, total, buckets) in self.hist.items():
                lines.append(f"# TYPE fastvlm_{name} histogram")
                running = 0
                for b, c in zip(list(buckets) + ["+Inf"], counts):
                    running += c
                    lines.append(f'fastvlm_{name}_bucket{{le="{b}"}} {running}')
                lines += [f"fastvlm_{name}_sum {total[0]:.6f}", f"fastvlm_{name}_count {running}"]
        for name, value in gauges.items():
            lines += [f"# TYPE fastvlm_{name} gauge", f"fastvlm_{name} {value}"]
        return "\n".join(lines) + "\n"


def memory_gauges() -> dict:
    """MLX's allocator (active, cached, peak) and the process's resident set, in bytes."""
    import mlx.core as mx

    gauges = dict(
        mlx_active_memory_bytes=mx.get_active_memory(),
        mlx_cache_memory_bytes=mx.get_cache_memory(),
        mlx_peak_memory_bytes=mx.get_peak_memory(),
    )
    try:
        with open("/proc/self/statm") as f:
            gauges["resident_memory_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # macOS: the peak resident set is what getrusage gives (in bytes there)
        import resource

        gauges["resident_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return gauges
