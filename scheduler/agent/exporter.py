"""The agent's `/metrics`, `/healthz` and `/livez`.

GPU series use DCGM exporter's names, units and labels (`gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`, then
`GPU_I_PROFILE` and `GPU_I_ID` for a MIG instance, then `Hostname`), so one PromQL query reads either exporter.
They are rendered at scrape time from the last sample: a device or reading that disappears stops being exported
instead of lingering at its last value.

`/healthz` answers 503 while NVML is unusable (readiness: Prometheus and operators see why); `/livez` answers 200
while the process serves, so a node without a driver is reported, not restarted in a loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.agent.sampler import METRICS, NodeSample

__all__ = ["DCGM_HELP", "AgentCollector", "Health", "MetricsServer"]

DCGM_HELP = {
    "DCGM_FI_DEV_GPU_UTIL": "GPU utilization (in %).",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "Memory utilization (in %).",
    "DCGM_FI_DEV_FB_USED": "Framebuffer memory used (in MiB).",
    "DCGM_FI_DEV_FB_FREE": "Framebuffer memory free (in MiB).",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "Ratio of time the graphics engine is active.",
}


@dataclass(frozen=True)
class Health:
    nvml_up: bool
    reason: str = ""
    since: float = 0.0


class AgentCollector(Collector):
    """Renders the latest `NodeSample` and the agent's health; `state()` returns both without locking."""

    def __init__(self, state: Callable[[], tuple[NodeSample | None, Health]], hostname: str) -> None:
        self._state = state
        self._hostname = hostname

    def collect(self) -> Iterator[Metric]:
        sample, health = self._state()
        yield GaugeMetricFamily(
            "gpu_agent_nvml_up", "1 while NVML answers, 0 while it is missing or failing", float(health.nvml_up)
        )
        if sample is None:
            return
        families = {name: GaugeMetricFamily(name, DCGM_HELP[name]) for name in METRICS}
        for device in sample.devices:
            labels = {
                "gpu": str(device.gpu),
                "UUID": device.uuid,
                "pci_bus_id": device.pci_bus_id,
                "device": f"nvidia{device.gpu}",
                "modelName": device.model_name,
            }
            if device.mig_profile is not None:
                labels["GPU_I_PROFILE"] = device.mig_profile
                labels["GPU_I_ID"] = str(device.gpu_instance_id)
            labels["Hostname"] = self._hostname
            for name, attr in METRICS.items():
                value = getattr(device, attr)
                if value is not None:
                    families[name].add_sample(name, labels, float(value))
        yield from (f for f in families.values() if f.samples)
        supported = GaugeMetricFamily(
            "gpu_agent_metric_supported",
            "1 where the GPU offers the metric, 0 where NVML reports it not supported (the series is then absent)",
            labels=["metric", "gpu"],
        )
        for (metric, gpu), ok in sorted(sample.supported.items()):
            supported.add_metric([metric, str(gpu)], float(ok))
        yield supported
        yield GaugeMetricFamily("gpu_agent_gpus", "Physical GPUs read in the last sample", float(len(sample.gpus)))
        yield GaugeMetricFamily(
            "gpu_agent_last_sample_timestamp_seconds", "When the last sample was taken", sample.taken_at
        )
        yield GaugeMetricFamily(
            "gpu_agent_sample_duration_seconds", "Time the last pass over the GPUs took", sample.duration_s
        )


def _handler(registry: CollectorRegistry, health: Callable[[], Health]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True  # headers and body go in separate sends
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(registry), content_type)
            elif path == "/healthz":
                h = health()
                body: dict[str, Any] = {"status": "ok" if h.nvml_up else "unhealthy", "nvml": h.nvml_up}
                if h.reason:
                    body["reason"] = h.reason
                self._send(200 if h.nvml_up else 503, orjson.dumps(body), "application/json")
            elif path == "/livez":
                self._send(200, b'{"status":"ok"}', "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class MetricsServer:
    """A small threaded HTTP server on its own daemon thread."""

    def __init__(self, registry: CollectorRegistry, health: Callable[[], Health], host: str, port: int) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(registry, health))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
