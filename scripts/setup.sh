#!/usr/bin/env bash
# Create .venv with everything tagger needs, from scratch on a fresh machine; a no-op when current.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
STAMP="$VENV/.tagger-installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  # torch first, pinned: the CPU build. Left to the resolver, pip would fetch a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
  touch "$STAMP"
fi
