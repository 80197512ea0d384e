#!/usr/bin/env bash
# The project's test command: set up, then run the whole suite. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = "5" ]; then
  echo "test: pytest collected no tests: the suite is broken" >&2
  exit 1
fi
exit "$rc"
