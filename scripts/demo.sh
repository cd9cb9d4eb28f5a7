#!/bin/bash
# The main job, offline: set everything up, start a local registry with a busybox
# image built from busybox-static, start skiffd in a private root, then pull and
# list the image with skiff.  Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
