"""kwok, the Kubernetes SIG's kubelet simulator, for e2e scenarios whose pods must run: it plays the kubelet of the
nodes it manages, so their pods turn Running and Ready after a configured delay (a cold start) and go away when
deleted. Built once from the Go module proxy at a pinned version into the harness's cache; its Stages are the
module's own (`kustomize/stage/node/fast`, `kustomize/stage/pod/general`), whose pod readiness delay a pod sets
with the annotation `pod-ready.stage.kwok.x-k8s.io/delay`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from e2e import procs
from e2e.build import _go_env, cache_root, find_go, go_install
from e2e.controlplane import ControlPlane

KWOK_VERSION = "v0.8.0"
MANAGED_LABEL = "e2e.gpu-extender.io/kwok"
READY_DELAY = "pod-ready.stage.kwok.x-k8s.io/delay"
READY_JITTER = "pod-ready.stage.kwok.x-k8s.io/jitter-delay"
STAGES = ("kustomize/stage/node/fast", "kustomize/stage/pod/general")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_kwok(log: Log = _stderr) -> Path:
    """The kwok binary (built on first use, about three minutes on two cores)."""
    out = cache_root() / f"kwok-{KWOK_VERSION}"
    return go_install(f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}", out, f"kwok {KWOK_VERSION}", log)


def stage_config() -> str:
    """The Stage documents kwok runs with, read from the module it was built from."""
    go = find_go(_stderr)
    modcache = subprocess.run(
        [str(go), "env", "GOMODCACHE"], env=_go_env(go), capture_output=True, text=True, check=True
    ).stdout.strip()
    root = Path(modcache) / f"sigs.k8s.io/kwok@{KWOK_VERSION}"
    documents = [
        path.read_text().strip()
        for directory in STAGES
        for path in sorted((root / directory).glob("*.yaml"))
        if path.name != "kustomization.yaml"
    ]
    return "\n---\n".join(documents) + "\n"


def start_kwok(plane: ControlPlane, log: Log = _stderr) -> procs.Component:
    """kwok managing the nodes labelled `MANAGED_LABEL=true` of `plane`; stopped with the plane."""
    binary = ensure_kwok(log)
    config = plane.workdir / "kwok-stages.yaml"
    config.write_text(stage_config())
    (port,) = procs.free_ports(1)
    argv = [
        str(binary),
        f"--kubeconfig={plane.kubeconfig}",
        f"--config={config}",
        f"--manage-nodes-with-label-selector={MANAGED_LABEL}=true",
        f"--server-address=127.0.0.1:{port}",
        "--cidr=10.244.0.0/16",
    ]
    component = procs.spawn("kwok", argv, plane.workdir / "logs" / "kwok.log")
    plane.components.append(component)
    return component


if __name__ == "__main__":  # `python -m e2e.kwok`: build it now rather than in the first test that needs it
    print(ensure_kwok())
