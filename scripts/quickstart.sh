#!/usr/bin/env bash
# Set up (if needed), then train -> package -> register -> promote -> predict on the embedded
# defaults. Options: bash scripts/quickstart.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" -m tagger quickstart --workdir "$ROOT" "$@"
