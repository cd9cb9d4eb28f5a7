#!/bin/bash
# One command: set everything up, then run every test (unit, then privileged integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --select F,E9 agent controller tests bench scripts
.venv/bin/mypy agent controller
exec .venv/bin/python -m pytest -q -ra tests "$@"
