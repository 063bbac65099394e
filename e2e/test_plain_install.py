"""What a user gets from `pip install .` with no extras (and what the image runs): every subcommand starts, the
service answers, the simulator writes its tables without matplotlib, and the declared runtime dependencies are
exactly the third-party packages the runtime imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.procs import free_ports

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("policies", "scheduler", "extender")
# Imported only where a missing package degrades with a message (plots, the local control plane's PKI).
OPTIONAL_IMPORTS = {"matplotlib"}
# Loaded by name, not imported: uvicorn's C HTTP parser and event loop (`http="httptools"`, `loop="uvloop"`).
LOADED_BY_NAME = {"httptools", "uvloop"}
# Import names that differ from the distribution's name.
DISTRIBUTION_OF = {"yaml": "pyyaml", "pynvml": "nvidia-ml-py", "kubernetes": "kubernetes"}

pytestmark = pytest.mark.slow


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower())
    return names


def _imported() -> set[str]:
    """Top-level third-party modules imported anywhere in the runtime packages, at any depth of the code."""
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for package in RUNTIME_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found.update(name.split(".")[0] for name in names)
    return {name for name in found if name not in stdlib and name not in RUNTIME_PACKAGES and name != "e2e"}


def test_declared_runtime_dependencies_are_what_the_runtime_imports() -> None:
    imported = {DISTRIBUTION_OF.get(name, name).lower().replace("_", "-") for name in _imported() - OPTIONAL_IMPORTS}
    declared = _declared() - LOADED_BY_NAME
    assert imported - declared == set(), "imported but not declared"
    assert declared - imported == set(), "declared but never imported"


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment holding the built wheel and its declared dependencies, no extras."""
    work = tmp_path_factory.mktemp("plain-install")
    run = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*run, "wheel", "--no-deps", "-w", str(work / "dist"), str(ROOT)], check=True, timeout=300)
    (wheel,) = (work / "dist").glob("kube_gpu_extender-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    python = work / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", str(wheel)], check=True, timeout=600
    )
    yield work / "venv"


def _cli(venv: Path, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "gpu-extender"), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_the_extras_are_absent(plain_venv: Path) -> None:
    probe = "import importlib.util as u; print([m for m in ('httpx', 'matplotlib', 'pytest') if u.find_spec(m)])"
    out = subprocess.run([str(plain_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_subcommand_starts(plain_venv: Path) -> None:
    from extender.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    commands = sorted(sub.choices)
    assert {"serve", "simulate", "explain", "agent", "cluster"} <= set(commands)
    assert _cli(plain_venv, "--help").returncode == 0
    for command in commands:
        result = _cli(plain_venv, command, "--help")
        assert result.returncode == 0, f"{command} --help: {result.stderr[-2000:]}"
        assert "usage:" in result.stdout


def test_cluster_without_its_extra_says_what_to_install(plain_venv: Path) -> None:
    result = _cli(plain_venv, "cluster", "up")
    assert result.returncode == 2
    assert "kube-gpu-extender[cluster]" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_answers_health_and_a_filter(plain_venv: Path) -> None:
    (port,) = free_ports(1)
    fleet = ROOT / "tests" / "data" / "wire-fleet.yaml"
    server = subprocess.Popen(
        [str(plain_venv / "bin" / "gpu-extender"), "serve", "--fleet", str(fleet), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "the extender did not come up"
                time.sleep(0.3)
        pod = {
            "metadata": {"name": "p", "namespace": "default", "uid": "u-1"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"nvidia.com/gpu": "1"}}}]},
        }
        body = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": ["gpu-a", "no-such-node"]}).encode()
        request = urllib.request.Request(f"{base}/filter", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer = json.loads(reply.read())
        assert answer["NodeNames"] == ["gpu-a"]
        assert answer["Error"] == ""
        assert "no-such-node" in answer["FailedAndUnresolvableNodes"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_simulate_writes_its_tables_without_matplotlib(plain_venv: Path, tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.csv"
    nodes.write_text(
        "sn,cpu_milli,memory_mib,gpu,model\n"
        + "".join(f"node-{i:02d},64000,262144,{2 + i % 3 * 2},V100M32\n" for i in range(12))
    )
    pods = tmp_path / "pods.csv"
    header = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,"
    pods.write_text(
        header
        + "scheduled_time\n"
        + "".join(
            f"pod-{i:03d},4000,8192,1,{(250, 500, 1000)[i % 3]},,LS,Running,{i},{i + 100},{i}\n" for i in range(40)
        )
    )
    out = tmp_path / "out"
    result = _cli(
        plain_venv,
        "simulate",
        "--nodes",
        str(nodes),
        "--pods",
        str(pods),
        "--policy",
        "default",
        "--seeds",
        "1",
        "--jobs",
        "1",
        "--out",
        str(out),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "summary.csv").is_file()
    assert "skipped: matplotlib is not installed" in result.stderr
    assert not list(out.glob("*.png"))
