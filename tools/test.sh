#!/bin/bash
# Set up (tools/setup.sh), lint (ruff) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check src tests tools   # the lint rules in pyproject.toml; noqa markers say why
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=600 "$@"
