"""A real Prometheus server (the Debian package) on loopback, scraping the harness's node agents.

It keeps its port and its TSDB across `stop()` and `start()`: the extender is configured with one URL, so an
outage is Prometheus going away and coming back where it was, with the series it had stored.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import yaml

from e2e import procs
from scheduler.promql import PrometheusClient, Series

DEFAULT_BINARY = "/usr/bin/prometheus"
JOB = "gpu-node-agent"


def find_prometheus() -> Path:
    """The installed `prometheus` binary; `e2e/setup.sh` installs Debian's package when it is missing."""
    found = shutil.which("prometheus") or (DEFAULT_BINARY if Path(DEFAULT_BINARY).is_file() else None)
    if found is None:
        raise procs.ComponentError("prometheus is not installed: run e2e/setup.sh (or apt-get install prometheus)")
    return Path(found)


class Prometheus:
    """One Prometheus process on a fixed free loopback port with a generated scrape configuration.

    ``targets`` are ``host:port`` addresses of `/metrics` endpoints, all in one job, scraped every
    ``scrape_interval_s`` (whole seconds or fractions Prometheus accepts, e.g. 1 or 0.5).
    """

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        scrape_interval_s: float = 1.0,
        name: str = "prometheus",
        binary: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.name = name
        self.binary = binary or find_prometheus()
        (self.port,) = procs.free_ports(1)
        self.component: procs.Component | None = None
        self.starts = 0
        self.config_path = workdir / f"{name}.yml"
        self.data_dir = workdir / f"{name}-data"
        self.log_path = workdir / "logs" / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, object]:
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": "1m"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }

    def start(self, timeout_s: float = 30.0) -> Prometheus:
        """Spawn Prometheus (again, on the same port and TSDB) and return once `/-/ready` answers 200."""
        if self.component is not None and self.component.alive():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        argv = [
            str(self.binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            "--storage.tsdb.retention.time=1h",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=info",
        ]
        self.component = procs.spawn(self.name, argv, self.log_path)
        self.component.port = self.port
        self.starts += 1
        try:
            procs.wait_until(self.component, lambda: procs.http_ok(f"{self.url}/-/ready"), "/-/ready", timeout_s, 0.1)
        except procs.ComponentError:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (Prometheus closes its TSDB cleanly, so a restart reuses it), SIGKILL after ``grace_s``."""
        if self.component is not None:
            procs.stop(self.component, grace_s)
            self.component = None

    def alive(self) -> bool:
        return self.component is not None and self.component.alive()

    def log_tail(self, lines: int = procs.LOG_TAIL_LINES) -> str:
        return procs.log_tail(self.log_path, lines)

    def query(self, promql: str) -> list[Series]:
        """Evaluate ``promql`` now, with the same client the extender uses."""
        return PrometheusClient(self.url, timeout_s=5.0).query(promql)

    def targets_health(self) -> dict[str, str]:
        """Scrape target address -> health (`up`, `down` or `unknown`) as Prometheus reports it now."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets?state=active", timeout=5) as resp:
            body = json.loads(resp.read())
        return {t["labels"]["instance"]: t["health"] for t in body["data"]["activeTargets"]}

    def wait_targets_up(self, timeout_s: float = 20.0) -> None:
        """Until every target has been scraped successfully; fails with the log tail otherwise."""
        assert self.component is not None, "Prometheus is not running"
        want = set(self.targets)
        procs.wait_until(
            self.component,
            lambda: {a for a, h in self.targets_health().items() if h == "up"} >= want,
            f"successful scrapes of {sorted(want)}",
            timeout_s,
            0.2,
        )

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
