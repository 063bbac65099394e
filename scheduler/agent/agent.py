"""The agent's loop: keep NVML initialised, sample every interval, publish the inventory when it changes.

A node whose driver is missing or broken must not crash-loop the DaemonSet: the failure is logged once with what
to do about it, `/healthz` turns unhealthy, and initialisation is retried with backoff while `/metrics` keeps
answering (with `gpu_agent_nvml_up 0` and no GPU series).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pynvml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.agent.exporter import AgentCollector, Health
from scheduler.agent.model_cache import ModelCache
from scheduler.agent.nvml import NvmlBackend
from scheduler.agent.publisher import NodePublisher
from scheduler.agent.sampler import NodeSample, Sampler, inventory_doc, shareable_gpus
from scheduler.backoff import Backoff

__all__ = ["Agent"]

log = logging.getLogger("gpu_extender.agent")

_HINTS = {
    "NVMLError_LibraryNotFound": "libnvidia-ml.so.1 is not in this container: run it with the NVIDIA container "
    "runtime (runtimeClassName: nvidia) or mount the driver's libraries",
    "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded on this node",
    "NVMLError_NoPermission": "no permission to open /dev/nvidia*: the container needs access to the GPU devices",
    "NVMLError_LibRmVersionMismatch": "the NVML library and the kernel driver differ in version (reboot after a "
    "driver upgrade)",
}


class Agent:
    """One node's sampler, health and publisher. `step()` does one iteration and never raises."""

    def __init__(
        self,
        backend: NvmlBackend,
        hostname: str,
        publisher: NodePublisher | None = None,
        interval_s: float = 5.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_backoff_s: float = 300.0,
        milli_per_gpu: int = 1000,
        model_cache: ModelCache | None = None,
    ) -> None:
        """`milli_per_gpu`: the `gpu-milli` advertised per shareable GPU; above 1000 when the policy lets batch
        shares borrow idle capacity, or the kubelet would refuse the borrowed share on admission. `model_cache`:
        the node's model weights directory, whose cached models the inventory lists."""
        self.registry = registry or CollectorRegistry()
        self.interval_s = interval_s
        self.milli_per_gpu = milli_per_gpu
        self._nvml = backend
        self._publisher = publisher
        self._model_cache = model_cache
        self._monotonic = monotonic
        self._sampler = Sampler(backend, clock)
        self._latest: NodeSample | None = None
        self._health = Health(False, "NVML not initialised yet", clock())
        self._clock = clock
        self._initialised = False
        self._retry_at = float("-inf")
        self._backoff = Backoff(initial_s=1.0, max_s=max_backoff_s)
        self._last_failure = ""
        self.init_failures = 0
        self.registry.register(AgentCollector(self.state, hostname))
        self.registry.register(_Counters(self))

    # -- readers -----------------------------------------------------------------------------------------
    def state(self) -> tuple[NodeSample | None, Health]:
        return self._latest, self._health

    def health(self) -> Health:
        return self._health

    @property
    def publisher(self) -> NodePublisher | None:
        return self._publisher

    @property
    def sampler(self) -> Sampler:
        return self._sampler

    # -- the loop ----------------------------------------------------------------------------------------
    def step(self) -> None:
        try:
            self._step()
        except Exception:  # a defect must not stop sampling or the metrics server
            log.exception("agent step failed")

    def _step(self) -> None:
        if not self._initialised and not self._init():
            return
        try:
            sample = self._sampler.sample()
        except pynvml.NVMLError as exc:
            self._failed("sampling", exc)
            with contextlib.suppress(pynvml.NVMLError):
                self._nvml.shutdown()
            self._initialised = False
            return
        self._latest = sample
        if not self._health.nvml_up:
            self._health = Health(True, "", self._clock())
        if self._publisher is None:
            return
        if not sample.complete:  # a GPU that failed to read would vanish from the inventory: keep the last one
            self._sampler.log_once(("incomplete",), "a GPU could not be read; the published inventory is kept")
            return
        doc = inventory_doc(sample.gpus, self._skipped)
        if self._model_cache is not None:
            doc = doc.model_copy(update={"cached_models": self._model_cache.models()})
        self._publisher.publish(doc, shareable_gpus(doc) * self.milli_per_gpu)

    def run(self, stop: threading.Event) -> None:
        """Step every `interval_s` until `stop` is set, then release NVML."""
        try:
            while not stop.is_set():
                started = self._monotonic()
                self.step()
                stop.wait(max(self.interval_s - (self._monotonic() - started), 0.01))
        finally:
            if self._initialised:
                with contextlib.suppress(pynvml.NVMLError):
                    self._nvml.shutdown()
                self._initialised = False

    # -- internals ---------------------------------------------------------------------------------------
    def _init(self) -> bool:
        if self._monotonic() < self._retry_at:
            return False
        try:
            self._nvml.init()
        except pynvml.NVMLError as exc:
            self.init_failures += 1
            self._failed("initialising NVML", exc)
            return False
        self._initialised = True
        self._sampler.reset()
        self._backoff.reset()
        self._retry_at = float("-inf")
        if self._last_failure:
            log.info("NVML is available again")
        self._last_failure = ""
        return True

    def _failed(self, during: str, exc: pynvml.NVMLError) -> None:
        kind = type(exc).__name__
        reason = f"{kind}: {exc}"
        delay = self._backoff.next()
        self._retry_at = self._monotonic() + delay
        self._latest = None
        if reason != self._last_failure:
            hint = _HINTS.get(kind, "")
            log.error(
                f"NVML unavailable while {during}; retrying with backoff" + (f" ({hint})" if hint else ""),
                extra={"error": reason, "retry_in_s": round(delay, 1)},
            )
        else:
            log.debug("NVML still unavailable", extra={"error": reason, "retry_in_s": round(delay, 1)})
        self._last_failure = reason
        if self._health.nvml_up or self._health.reason != reason:
            self._health = Health(False, reason, self._clock())

    def _skipped(self, message: str, fields: dict[str, object]) -> None:
        self._sampler.log_once(("inventory", message, *fields.values()), message, **fields)


class _Counters(Collector):
    """NVML call failures and Node updates, read from the objects that count them."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "gpu_agent_nvml_errors", "NVML calls that failed other than as not supported", labels=["call", "error"]
        )
        for (call, kind), n in sorted(self._agent.sampler.errors.copy().items()):
            errors.add_metric([call, kind], n)
        yield errors
        yield CounterMetricFamily(
            "gpu_agent_nvml_init_failures", "Failed NVML initialisations", self._agent.init_failures
        )
        publisher = self._agent.publisher
        if publisher is not None:
            patches = CounterMetricFamily("gpu_agent_node_patches", "Writes to this agent's Node", labels=["target"])
            for target, n in sorted(publisher.patches.items()):
                patches.add_metric([target], n)
            yield patches
            yield CounterMetricFamily(
                "gpu_agent_node_patch_errors", "Failed attempts to update the Node", publisher.errors
            )
