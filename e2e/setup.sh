#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian machine: the Python package with its test
# extras in the project's virtual environment ($VENV, default .venv), Prometheus from Debian, and (through e2e.build
# and e2e.kwok) etcd, kube-apiserver, kube-scheduler, kube-controller-manager and kwok from Go modules.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "installing ${need_apt[*]} from Debian" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "missing ${need_apt[*]}: run 'sudo apt-get install ${need_apt[*]}'" >&2
    exit 1
  fi
fi

venv=${VENV:-.venv}
if [[ ! -x $venv/bin/python ]]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 leaves venv's pip bootstrap to a package of its own.
    rm -rf "$venv"
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
"$venv/bin/python" -m e2e.build
"$venv/bin/python" -m e2e.kwok
