#!/bin/bash
# One command: set everything up, then run every test (unit, then privileged integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra tests "$@"
