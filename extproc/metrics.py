"""Prometheus metrics of the processor, on its own loopback port (``serve --metrics-port``).

Names follow LiteLLM's deployment metrics where they exist (``litellm_deployment_*``,
``litellm_remaining_*``) so existing dashboards keep working; ours are prefixed ``llm_``. Counters are
updated from access-log outcomes (off the request path); gauges are read from the counter store when
scraped. Label values are names and ids, never keys.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
from collections.abc import Callable, Iterable

from .config import Deployment
from .routing import Router
from .store import DeploymentState, Outcome

log = logging.getLogger("extproc.metrics")

DECISION_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self, name: str) -> Iterable[str]:
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            yield f'{name}_bucket{{le="{bound}"}} {cumulative}'
        cumulative += self.counts[-1]
        yield f'{name}_bucket{{le="+Inf"}} {cumulative}'
        yield f"{name}_sum {self.total}"
        yield f"{name}_count {cumulative}"


class Metrics:
    def __init__(self) -> None:
        self.responses: collections.Counter[tuple[str, str, int]] = collections.Counter()  # (group, id, status)
        self.tokens: collections.Counter[tuple[str, str]] = collections.Counter()
        self.decisions = Histogram(DECISION_BUCKETS_S)
        self.abandoned = 0  # requests whose client left before the routing decision reached Envoy
        self.generation = 0  # successful config reloads since start
        self.rejected_reloads = 0

    def record_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.responses[(outcome.group, outcome.key, outcome.status)] += 1
            if outcome.total_tokens:
                self.tokens[(outcome.group, outcome.key)] += outcome.total_tokens

    async def render(self, router: Router) -> str:
        lines: list[str] = []
        labels: dict[str, str] = {}
        for dep in router.config.deployments:
            labels[dep.id] = (
                f'model_group="{_escape(dep.model_name)}",model_id="{_escape(dep.id)}",'
                f'deployment="{_escape(dep.deployment)}",api_base="{_escape(dep.api_base)}"'
            )

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("litellm_deployment_total_requests", "counter", "Routed requests that ended, per deployment")
        for (_group, key, status), n in sorted(self.responses.items()):
            lines.append(f'litellm_deployment_total_requests{{{labels.get(key, "")},status="{status}"}} {n}')
        family("litellm_deployment_success_responses", "counter", "2xx responses per deployment")
        success: collections.Counter[str] = collections.Counter()
        failure: collections.Counter[str] = collections.Counter()
        for (_group, key, status), n in self.responses.items():
            (success if 200 <= status < 300 else failure)[key] += n
        for key, n in sorted(success.items()):
            lines.append(f"litellm_deployment_success_responses{{{labels.get(key, '')}}} {n}")
        family("litellm_deployment_failure_responses", "counter", "Non-2xx responses per deployment")
        for key, n in sorted(failure.items()):
            lines.append(f"litellm_deployment_failure_responses{{{labels.get(key, '')}}} {n}")
        family("litellm_deployment_total_tokens", "counter", "Tokens used (from response usage) per deployment")
        for (_group, key), n in sorted(self.tokens.items()):
            lines.append(f"litellm_deployment_total_tokens{{{labels.get(key, '')}}} {n}")

        Read = Callable[[DeploymentState, Deployment], float | int | None]
        gauges: dict[str, tuple[str, Read]] = {
            "llm_deployment_in_flight": ("Requests routed and not yet finished", lambda s, d: s.in_flight),
            "llm_deployment_rpm_used": ("Requests in the sliding 60 s window", lambda s, d: s.rpm_used),
            "llm_deployment_tpm_used": ("Tokens in the sliding 60 s window", lambda s, d: s.tpm_used),
            "litellm_remaining_requests_metric": (
                "rpm limit minus requests in the window (deployments with an rpm limit)",
                lambda s, d: None if d.rpm is None else max(0, d.rpm - s.rpm_used),
            ),
            "litellm_remaining_tokens": (
                "tpm limit minus tokens in the window (deployments with a tpm limit)",
                lambda s, d: None if d.tpm is None else max(0, d.tpm - s.tpm_used),
            ),
            "litellm_deployment_cooled_down": (
                "1 while the deployment is in cooldown", lambda s, d: int(s.cooldown_s > 0),
            ),
            "llm_deployment_cooldown_seconds": ("Seconds of cooldown left", lambda s, d: s.cooldown_s),
            "litellm_deployment_latency_per_output_token": (
                "Mean seconds per output token over the latency sample window",
                lambda s, d: s.latency,
            ),
        }
        snapshots = {}
        for group_name, group in router.groups().items():
            snapshots[group_name] = (group.deployments, await router.store.states(group_name, group.candidates))
        for metric, (help_text, read) in gauges.items():
            family(metric, "gauge", help_text)
            for deployments, states in snapshots.values():
                for dep, state in zip(deployments, states, strict=True):
                    value = read(state, dep)
                    if value is not None:
                        lines.append(f"{metric}{{{labels[dep.id]}}} {value}")
        family("llm_config_generation", "gauge", "Config reloads applied since the processor started")
        lines.append(f"llm_config_generation {self.generation}")
        family("llm_config_reloads_rejected_total", "counter", "Reloads refused because the new config is invalid")
        lines.append(f"llm_config_reloads_rejected_total {self.rejected_reloads}")
        family("llm_abandoned_requests_total", "counter", "Clients gone before the routing decision landed")
        lines.append(f"llm_abandoned_requests_total {self.abandoned}")
        family("llm_routing_decision_seconds", "histogram", "Processor time per routing decision")
        lines.extend(self.decisions.render("llm_routing_decision_seconds"))
        family("llm_store_backend_info", "gauge", "Which counter store is in use")
        lines.append(f'llm_store_backend_info{{backend="{router.store.backend}"}} 1')
        family("llm_store_degraded", "gauge", "1 while the shared store is unreachable and counting is per processor")
        lines.append(f"llm_store_degraded {int(getattr(router.store, 'degraded', False))}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve_metrics(
    metrics: Metrics, router: Callable[[], Router], host: str, port: int
) -> asyncio.Server:
    """A minimal HTTP/1.1 endpoint: GET /metrics (Prometheus text), anything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body = (await metrics.render(router())).encode()
                status, content_type = "200 OK", "text/plain; version=0.0.4"
            else:
                body, status, content_type = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
