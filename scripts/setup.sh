#!/bin/bash
# Set up everything skiff needs on a Debian 12 machine, as root: system packages,
# a virtualenv in .venv with skiff and its dependencies (editable, with dev extras).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev gcc            # the virtualenv, and building wheels if a binary one is missing
  docker-registry skopeo umoci            # real registry server and an independent image client for tests
  busybox-static tini                     # test images; the --init process
  podman runc                             # interop checks (podman load) and the runc executor
  python3-seccomp                         # libseccomp's own binding, loaded by agent.runtime.seccomp
  jq curl apache2-utils iproute2 util-linux
  openssh-server openssh-client pssh      # the SSH transport, the fleet lab's sshd, the fan-out benchmark
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# compat mode: a plain path entry instead of setuptools' import hook, ~9 ms off every Python start
# (each skiff command and each container's shim); protos/ holds the generated `skiff` package.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" --config-settings editable_mode=compat \
  2>&1 | grep -v -e "^WARNING: Location" -e "editable_mode" -e "_EditableMode" -e "^ *!!" -e "^ *$" || true
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/protos" > "$SITE/skiff-protos.pth"
# Byte-compile now: with PYTHONDONTWRITEBYTECODE set (as on some machines) every skiff command
# and every shim would otherwise recompile the project's modules on each start.
.venv/bin/python -m compileall -q -j 0 agent controller protos >/dev/null
.venv/bin/python -c "import skiff.v1.images_pb2, agent, controller" >/dev/null
.venv/bin/python -c "from agent.runtime.seccomp import load_binding; load_binding()" \
  || echo "setup: warning: libseccomp's Python binding does not load here; seccomp profiles cannot be applied" >&2
# The socket group (dockerd's "docker" group).
getent group skiff >/dev/null || groupadd --system skiff 2>/dev/null || true
echo "setup: ready (.venv/bin/skiff, .venv/bin/skiffd)"
