"""The node agent over real HTTP on loopback: DCGM-compatible `/metrics`, health, and NVML failures without crashes."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.agent.agent import Agent
from scheduler.agent.exporter import MetricsServer
from scheduler.agent.fake_nvml import FakeNvml
from scheduler.agent.sampler import inventory_doc, shareable_gpus

DCGM_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"}


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


@pytest.fixture
def serve() -> Iterator:
    servers: list[MetricsServer] = []

    def start(agent: Agent) -> int:
        server = MetricsServer(agent.registry, agent.health, "127.0.0.1", 0).start()
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.stop()


def test_metrics_carry_dcgm_names_labels_and_units(serve) -> None:
    fake = FakeNvml.from_spec("h100,h100/mig=3g.40gb@0+1g.10gb@6,t4;util=const:40;mem=const:25", hostname="n1")
    agent = Agent(fake, "node-1")
    agent.step()
    agent.step()  # engine activity needs an interval
    metrics = scrape(serve(agent))

    util = {labels["gpu"]: (labels, v) for labels, v in metrics["DCGM_FI_DEV_GPU_UTIL"]}
    assert set(util) == {"0", "2"}  # the MIG GPU reports no utilization: omitted, not 0
    labels, value = util["0"]
    assert set(labels) == DCGM_LABELS and value == 40.0
    assert labels["device"] == "nvidia0" and labels["Hostname"] == "node-1"
    assert labels["modelName"] == "NVIDIA H100 80GB HBM3" and labels["UUID"] == fake.gpus[0].uuid
    assert util["2"][0]["modelName"] == "Tesla T4"

    engine = metrics["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]
    whole = [v for lab, v in engine if lab["gpu"] == "0"]
    mig = {lab["GPU_I_PROFILE"]: (lab, v) for lab, v in engine if lab["gpu"] == "1"}
    assert whole == [pytest.approx(0.4)]
    assert set(mig) == {"3g.40gb", "1g.10gb"}  # activity is how a MIG instance shows its load
    lab, v = mig["3g.40gb"]
    assert set(lab) == DCGM_LABELS | {"GPU_I_PROFILE", "GPU_I_ID"} and v == pytest.approx(0.4)
    assert lab["UUID"] == fake.gpus[1].uuid and lab["device"] == "nvidia1"  # the parent GPU, as DCGM labels it
    assert not any(lab["gpu"] == "2" for lab, _ in engine)  # no GPM on a T4

    used = {(lab["gpu"], lab.get("GPU_I_ID", "")): v for lab, v in metrics["DCGM_FI_DEV_FB_USED"]}
    free = {(lab["gpu"], lab.get("GPU_I_ID", "")): v for lab, v in metrics["DCGM_FI_DEV_FB_FREE"]}
    assert used[("0", "")] + free[("0", "")] == 81_559  # MiB
    assert used[("2", "")] == 15_360 / 4
    assert {k for k in used if k[0] == "1"} == {("1", ""), ("1", "1"), ("1", "2")}

    supported = {(lab["metric"], lab["gpu"]): v for lab, v in metrics["gpu_agent_metric_supported"]}
    assert supported[("DCGM_FI_DEV_GPU_UTIL", "1")] == 0.0
    assert supported[("DCGM_FI_DEV_GPU_UTIL", "0")] == 1.0
    assert supported[("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "1")] == 1.0
    assert supported[("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "2")] == 0.0
    assert metrics["gpu_agent_nvml_up"] == [({}, 1.0)]
    assert metrics["gpu_agent_gpus"] == [({}, 3.0)]


def test_first_sample_has_no_engine_activity_yet(serve) -> None:
    agent = Agent(FakeNvml.from_spec("h100;util=const:40"), "n1")
    agent.step()
    metrics = scrape(serve(agent))
    assert "DCGM_FI_PROF_GR_ENGINE_ACTIVE" not in metrics
    assert metrics["DCGM_FI_DEV_GPU_UTIL"][0][1] == 40.0


def test_missing_driver_is_unhealthy_logged_once_and_retried_with_backoff(serve, caplog) -> None:
    fake = FakeNvml.from_spec("h100x2;util=const:10", hostname="n1")
    fake.always_fail = 9  # NVML_ERROR_DRIVER_NOT_LOADED
    mono = Clock(0.0)
    agent = Agent(fake, "n1", monotonic=mono, max_backoff_s=60.0)
    port = serve(agent)
    with caplog.at_level(logging.DEBUG, logger="gpu_extender.agent"):
        for _ in range(200):  # 200 intervals of 1 s
            agent.step()
            mono.t += 1.0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "kernel driver is not loaded" in errors[0].getMessage()
    assert 4 <= fake.init_calls <= 12  # backoff: far fewer attempts than intervals
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and "DriverNotLoaded" in body
    assert get(f"http://127.0.0.1:{port}/livez")[0] == 200
    metrics = scrape(port)
    assert metrics["gpu_agent_nvml_up"] == [({}, 0.0)]
    assert "DCGM_FI_DEV_FB_USED" not in metrics
    assert metrics["gpu_agent_nvml_init_failures_total"][0][1] == fake.init_calls

    fake.always_fail = None  # the driver is back
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpu_extender.agent"):
        for _ in range(120):
            agent.step()
            mono.t += 1.0
    assert agent.health().nvml_up
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    assert any("available again" in r.getMessage() for r in caplog.records)
    assert len(scrape(port)["DCGM_FI_DEV_GPU_UTIL"]) == 2


def test_nvml_lost_mid_run_drops_series_and_reinitialises(serve) -> None:
    fake = FakeNvml.from_spec("t4x2", hostname="n1")
    mono = Clock(0.0)
    agent = Agent(fake, "n1", monotonic=mono)
    port = serve(agent)
    agent.step()
    assert len(scrape(port)["DCGM_FI_DEV_GPU_UTIL"]) == 2
    fake.shutdown()  # as if the library were torn down under us: every call is Uninitialized
    agent.step()
    assert not agent.health().nvml_up
    assert "DCGM_FI_DEV_GPU_UTIL" not in scrape(port)
    mono.t += 10.0
    agent.step()
    assert agent.health().nvml_up and len(scrape(port)["DCGM_FI_DEV_GPU_UTIL"]) == 2


def test_a_lost_gpu_is_left_out_and_counted(serve) -> None:
    fake = FakeNvml.from_spec("h100x3;lost=1", hostname="n1")
    agent = Agent(fake, "n1")
    agent.step()
    metrics = scrape(serve(agent))
    assert sorted(lab["gpu"] for lab, _ in metrics["DCGM_FI_DEV_FB_USED"]) == ["0", "2"]
    errors = {(lab["call"], lab["error"]): v for lab, v in metrics["gpu_agent_nvml_errors_total"]}
    assert errors == {("device", "NVMLError_GpuIsLost"): 1.0}
    assert agent.health().nvml_up


def test_inventory_from_a_sample() -> None:
    fake = FakeNvml.from_spec("h100,h100/mig=3g.40gb@4+2g.20gb@0+1g.10gb+me@3,t4", hostname="n1")
    agent = Agent(fake, "n1")
    agent.step()
    sample, _ = agent.state()
    assert sample is not None
    doc = inventory_doc(sample.gpus)
    by_index = {g.index: g for g in doc.gpus}
    assert by_index[0].model == "NVIDIA-H100-80GB-HBM3" and by_index[0].memory_mib == 81_559
    assert by_index[0].mig is not None and not by_index[0].mig.enabled
    mig = by_index[1].mig
    assert mig is not None and mig.enabled
    assert [(i.profile, i.start) for i in mig.instances] == [("2g.20gb", 0), ("3g.40gb", 4)]  # `+me` left out
    assert all(i.uuid.startswith("MIG-") for i in mig.instances)
    assert by_index[2].model == "Tesla-T4" and by_index[2].mig is None
    assert shareable_gpus(doc) == 2


def test_cli_once_prints_a_scrape() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scheduler.agent.cli",
            "--nvml",
            "fake:a100-80gb/mig=7g.80gb@0,t4",
            "--no-publish",
            "--once",
            "--hostname",
            "h7",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert 'DCGM_FI_DEV_FB_USED{GPU_I_ID="0",GPU_I_PROFILE="7g.80gb",Hostname="h7"' in out.stdout
    assert 'DCGM_FI_DEV_GPU_UTIL{Hostname="h7"' in out.stdout


def test_cli_refuses_to_publish_without_a_node_name(monkeypatch) -> None:
    from scheduler.agent.cli import main

    monkeypatch.delenv("NODE_NAME", raising=False)
    assert main(["--nvml", "fake:t4", "--node-name", ""]) == 2
    assert main(["--nvml", "fake:v100", "--no-publish"]) == 2


def test_cli_serves_on_loopback_and_stops_on_sigterm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.agent.cli",
            "--nvml",
            "fake:t4x2;util=const:5",
            "--no-publish",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--hostname",
            "loop-1",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if 'Hostname="loop-1"' in get(f"http://127.0.0.1:{port}/metrics")[1]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
