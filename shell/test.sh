#!/usr/bin/env bash
# The README's test command: set up ./.venv, then run the whole test suite.
# Pass pytest arguments through, e.g. `shell/test.sh -m "not slow"` for the fast set alone.
# One pytest worker per core (pytest-xdist), one thread each (tests/conftest.py); `-n 0` runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
shell/setup.sh
exec .venv/bin/python -m pytest -n auto --dist load --maxschedchunk 1 --durations=25 "$@"
