"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-schedulers, no kubelets.

Use it as a context manager in tests, or detach it from the command line (``up`` / ``down``).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import fcntl
import json
import os
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kubernetes.client
import yaml
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from e2e import pki, procs
from e2e.build import Binaries, cache_root, ensure_binaries
from e2e.procs import Component, ComponentError

SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
DISABLED_ADMISSION = "ServiceAccount,TaintNodesByCondition"
"""No kubelets: new nodes would keep the not-ready taint, and pods would need a service account token."""
ETCD_DIR_PREFIX = "gpu-extender-etcd-"


def _etcd_running_in(directory: Path) -> bool:
    """etcd holds an exclusive flock on its bbolt database for as long as it runs."""
    dbs = list(directory.glob("**/member/snap/db"))
    if not dbs:  # not initialised yet, or never will be: judge by age
        try:
            return time.time() - directory.stat().st_mtime < 300
        except OSError:
            return False
    for db in dbs:
        try:
            with open(db, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            continue
    return False


def sweep_stale_etcd_dirs(base: Path) -> None:
    """Remove etcd data dirs no etcd uses (a killed test run cannot clean up; on tmpfs they hold RAM)."""
    for directory in base.glob(f"{ETCD_DIR_PREFIX}*"):
        if not _etcd_running_in(directory):
            shutil.rmtree(directory, ignore_errors=True)


def _kubeconfig(server: str, ca: Path, cert: pki.CertPair, user: str) -> dict[str, Any]:
    """A self-contained kubeconfig (certificates embedded), so it stays valid wherever it is copied."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [
            {"name": user, "user": {"client-certificate-data": b64(cert.cert), "client-key-data": b64(cert.key)}}
        ],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
        "current-context": "e2e",
    }


class ControlPlane:
    """etcd + kube-apiserver (secure port only, Node,RBAC) with an admin kubeconfig; schedulers on demand.

    ``workdir`` defaults to a fresh temporary directory that teardown removes. ``detached`` leaves the
    processes running when this Python process exits (for ``cluster up``).
    """

    def __init__(
        self,
        binaries: Binaries | None = None,
        workdir: Path | None = None,
        detached: bool = False,
        ready_timeout_s: float = 90.0,
        apiserver_args: list[str] | None = None,
        etcd_on_tmpfs: bool = True,
    ) -> None:
        self.binaries = binaries
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gpu-extender-e2e-"))
        self.detached = detached
        self.ready_timeout_s = ready_timeout_s
        self.apiserver_args = list(apiserver_args or [])
        self.etcd_on_tmpfs = etcd_on_tmpfs
        self.components: list[Component] = []
        self.schedulers: dict[str, Component] = {}
        self.server = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.scheduler_kubeconfig = self.workdir / "scheduler.kubeconfig"
        self.etcd_dir: Path | None = None
        self._pki: pki.Pki | None = None
        self._ssl: ssl.SSLContext | None = None

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Generate PKI, start etcd and kube-apiserver, wait until ready, write kubeconfigs."""
        if self.binaries is None:
            self.binaries = ensure_binaries()
        if not self.detached:
            atexit.register(self.stop)
        self._pki = pki.generate(self.workdir / "pki")
        etcd_port, etcd_peer, api_port = procs.free_ports(3)
        self.server = f"https://127.0.0.1:{api_port}"
        self._start_etcd(etcd_port, etcd_peer)
        self._start_apiserver(etcd_port, api_port)
        self._write_kubeconfigs()
        self._wait_default_namespace()

    def _start_etcd(self, port: int, peer: int) -> None:
        """etcd's data lives on tmpfs when possible: fsync is then free, and writes stop being disk-bound."""
        shm = Path("/dev/shm")
        base = shm if self.etcd_on_tmpfs and os.access(shm, os.W_OK) else self.workdir
        sweep_stale_etcd_dirs(base)
        self.etcd_dir = Path(tempfile.mkdtemp(prefix=ETCD_DIR_PREFIX, dir=base))
        client, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
        assert self.binaries is not None
        argv = [
            str(self.binaries.etcd),
            "--name=e2e",
            f"--data-dir={self.etcd_dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=e2e={peer_url}",
            "--initial-cluster-state=new",
            "--quota-backend-bytes=8589934592",
            "--snapshot-count=50000",
            "--logger=zap",
            "--log-level=warn",
        ]
        etcd = self._spawn("etcd", argv)
        procs.wait_until(etcd, lambda: procs.http_ok(f"{client}/health"), "/health", self.ready_timeout_s)

    def _start_apiserver(self, etcd_port: int, port: int) -> None:
        p = self._pki
        assert p is not None and self.binaries is not None
        argv = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={p.apiserver.cert}",
            f"--tls-private-key-file={p.apiserver.key}",
            f"--client-ca-file={p.ca.cert}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--requestheader-client-ca-file={p.front_proxy_ca.cert}",
            f"--requestheader-allowed-names={pki.FRONT_PROXY_CLIENT}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={p.front_proxy_client.cert}",
            f"--proxy-client-key-file={p.front_proxy_client.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            f"--disable-admission-plugins={DISABLED_ADMISSION}",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            *self.apiserver_args,
        ]
        api = self._spawn("kube-apiserver", argv)
        api.port = port
        self._ssl = ssl.create_default_context(cafile=str(p.ca.cert))
        self._ssl.load_cert_chain(str(p.admin.cert), str(p.admin.key))
        procs.wait_until(
            api, lambda: procs.http_ok(f"{self.server}/readyz", self._ssl), "/readyz", self.ready_timeout_s, 0.2
        )

    def _write_kubeconfigs(self) -> None:
        p = self._pki
        assert p is not None
        for path, cert, user in (
            (self.kubeconfig, p.admin, "admin"),
            (self.scheduler_kubeconfig, p.scheduler, "system:kube-scheduler"),
        ):
            path.write_text(yaml.safe_dump(_kubeconfig(self.server, p.ca.cert, cert, user)))
            path.chmod(0o600)

    def _wait_default_namespace(self) -> None:
        """/readyz can precede the namespace controller; pods created in 'default' would then be rejected."""
        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)

            def exists() -> bool:
                try:
                    core.read_namespace("default")
                    return True
                except ApiException:
                    return False

            procs.wait_until(self.component("kube-apiserver"), exists, "namespace default", self.ready_timeout_s)

    def _spawn(self, name: str, argv: list[str]) -> Component:
        component = procs.spawn(name, argv, self.workdir / "logs" / f"{name}.log", self.detached)
        self.components.append(component)
        return component

    def component(self, name: str) -> Component:
        """The started component called ``name`` (etcd, kube-apiserver or a scheduler's name)."""
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(name)

    def api_client(self, pool_maxsize: int | None = None) -> kubernetes.client.ApiClient:
        """A fresh admin ``ApiClient``; raise ``pool_maxsize`` for many concurrent requests."""
        configuration = kubernetes.client.Configuration()
        kube_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig), client_configuration=configuration
        )
        if pool_maxsize:
            configuration.connection_pool_maxsize = pool_maxsize
        return kubernetes.client.ApiClient(configuration)

    def start_scheduler(
        self,
        config_yaml_text: str,
        name: str = "kube-scheduler",
        extra_args: list[str] | None = None,
        timeout_s: float | None = None,
    ) -> Component:
        """Launch kube-scheduler with the caller's KubeSchedulerConfiguration and wait for /readyz.

        The harness only sets ``clientConnection.kubeconfig`` (identity ``system:kube-scheduler``).
        """
        if name in self.schedulers:
            raise ValueError(f"a scheduler named {name!r} is already running")
        assert self.binaries is not None
        cfg = yaml.safe_load(config_yaml_text) or {}
        cfg.setdefault("clientConnection", {})["kubeconfig"] = str(self.scheduler_kubeconfig)
        cfg_path = self.workdir / f"{name}.config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        (port,) = procs.free_ports(1)
        kc = self.scheduler_kubeconfig
        argv = [
            str(self.binaries.kube_scheduler),
            f"--config={cfg_path}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--cert-dir={self.workdir / (name + '-certs')}",
            *(extra_args or []),
        ]
        sched = self._spawn(name, argv)
        sched.port = port
        self.schedulers[name] = sched
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        try:
            procs.wait_until(
                sched,
                lambda: procs.http_ok(f"https://127.0.0.1:{port}/readyz", insecure),
                "/readyz",
                timeout_s or self.ready_timeout_s,
                0.2,
            )
        except ComponentError:
            self.stop_scheduler(sched)
            raise
        return sched

    def start_controller_manager(
        self, controllers: Sequence[str] = ("deployment", "replicaset", "horizontalpodautoscaling")
    ) -> Component:
        """kube-controller-manager running only `controllers` (what a scenario needs of it: Deployments make
        ReplicaSets make pods), as admin, leader election off; waits for /healthz."""
        assert self.binaries is not None and self.binaries.kube_controller_manager is not None
        (port,) = procs.free_ports(1)
        kc = self.kubeconfig
        argv = [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--controllers={','.join(controllers)}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'controller-manager-certs'}",
            "--concurrent-deployment-syncs=5",
            "--concurrent-replicaset-syncs=5",
            "--horizontal-pod-autoscaler-sync-period=5s",
        ]
        manager = self._spawn("kube-controller-manager", argv)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        procs.wait_until(
            manager, lambda: procs.http_ok(f"https://127.0.0.1:{port}/healthz", insecure), "/healthz", 60.0, 0.2
        )
        return manager

    def stop_component(self, handle: Component, grace_s: float = 10.0) -> None:
        """Stop one process started beside the control plane (a controller manager, kwok) before the plane."""
        procs.stop(handle, grace_s)
        if handle in self.components:
            self.components.remove(handle)

    def stop_scheduler(self, handle: Component, grace_s: float = 10.0) -> None:
        """Stop one scheduler started by :meth:`start_scheduler`."""
        procs.stop(handle, grace_s)
        self.schedulers.pop(handle.name, None)
        if handle in self.components:
            self.components.remove(handle)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every started process (schedulers first, etcd last) and remove temporary directories."""
        for component in reversed(self.components):
            procs.stop(component, grace_s)
        self.components.clear()
        self.schedulers.clear()
        if self.etcd_dir is not None:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
            self.etcd_dir = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    def pids(self) -> list[int]:
        """PIDs of the processes this control plane runs now."""
        return [c.pid for c in self.components]

    def state(self) -> dict[str, Any]:
        """What ``down`` needs to stop a detached control plane, and what users need to reach it."""
        return {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "workdir": str(self.workdir),
            "etcd_dir": str(self.etcd_dir) if self.etcd_dir else None,
            "components": [
                {"name": c.name, "pid": c.pid, "exe": c.argv[0], "log": str(c.log_path)} for c in self.components
            ],
        }


def state_file() -> Path:
    """Where ``up`` records the detached control plane for ``down``."""
    return cache_root() / "cluster" / "state.json"


def _owned(entry: dict[str, Any]) -> bool:
    """Guard against PID reuse: only signal a PID that still runs the executable we started."""
    try:
        exe = os.readlink(f"/proc/{entry['pid']}/exe")
    except OSError:
        return False
    return os.path.realpath(exe) == os.path.realpath(str(entry["exe"]))


def up(scheduler_config: Path | None = None) -> dict[str, Any]:
    """Start a detached control plane (and optionally a scheduler) and record it in the state file."""
    path = state_file()
    if path.exists():
        state: dict[str, Any] = json.loads(path.read_text())
        if any(_owned(c) for c in state["components"]):
            return state
        down()
    workdir = path.parent / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    plane = ControlPlane(workdir=workdir, detached=True)
    try:
        plane.start()
        if scheduler_config is not None:
            plane.start_scheduler(scheduler_config.read_text())
    except BaseException:
        plane.stop()
        raise
    state = plane.state()
    path.write_text(json.dumps(state, indent=2))
    return state


def down(grace_s: float = 10.0) -> bool:
    """Stop the processes recorded by ``up`` (schedulers first) and remove its files."""
    path = state_file()
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    for entry in reversed(state["components"]):
        if _owned(entry):
            procs.stop(Component(entry["name"], entry["pid"], Path(entry["log"]), [entry["exe"]]), grace_s)
    if state.get("etcd_dir"):
        shutil.rmtree(state["etcd_dir"], ignore_errors=True)
    shutil.rmtree(state["workdir"], ignore_errors=True)
    path.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """``cluster up|down|status``: a control plane that outlives the command, for manual work."""
    parser = argparse.ArgumentParser(prog="cluster", description="local Kubernetes control plane on loopback")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up_cmd = sub.add_parser("up", help="start etcd + kube-apiserver (and a scheduler) in the background")
    up_cmd.add_argument("--scheduler-config", type=Path, help="KubeSchedulerConfiguration to run a scheduler with")
    sub.add_parser("down", help="stop what 'up' started")
    sub.add_parser("status", help="print the running control plane, if any")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        started = time.monotonic()
        try:
            state = up(args.scheduler_config)
        except ComponentError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"server:     {state['server']}")
        print(f"kubeconfig: {state['kubeconfig']}")
        print(f"export KUBECONFIG={state['kubeconfig']}   # ready in {time.monotonic() - started:.1f}s")
        return 0
    if args.cmd == "down":
        print("stopped" if down() else "no control plane recorded")
        return 0
    path = state_file()
    if not path.exists():
        print("no control plane recorded")
        return 1
    state = json.loads(path.read_text())
    for entry in state["components"]:
        print(f"{entry['name']:16} pid {entry['pid']:<8} {'running' if _owned(entry) else 'gone'}")
    print(f"server:     {state['server']}\nkubeconfig: {state['kubeconfig']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
