#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite, real-model tests included: tier by tier,
# each timed, the fast tiers (unit, parity) a second time with --dtype auto forced to the other
# type (scripts/tiers.py). With arguments, one plain pytest run instead:
#   bash scripts/test.sh -m parity                  # one tier
#   bash scripts/test.sh tests/test_doors.py --auto-dtype bfloat16
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ "$#" -eq 0 ]; then
  exec python scripts/tiers.py
fi
python -m pytest -q -p no:cacheprovider "$@"
