#!/usr/bin/env bash
# Build tagger's wheel, install it into a fresh virtualenv and run the quickstart (train 1 epoch -> package ->
# register -> promote -> predict) from an empty folder outside the repo, then load the promoted model from its
# own files: what a user of the wheel gets (CI runs this after the tests). Extra arguments go to
# `tagger quickstart` (e.g. --num-epochs 2). WHEEL_SMOKE_DIR=<folder> keeps the venv, wheel and MLflow store
# there; by default they go to a temporary folder, removed at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
started=$SECONDS
if [ -n "${WHEEL_SMOKE_DIR:-}" ]; then
  work="$(mkdir -p "$WHEEL_SMOKE_DIR" && cd "$WHEEL_SMOKE_DIR" && pwd)"
  rm -rf "$work/src" "$work/dist" "$work/venv" "$work/run" "$work/store"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
fi
case "$work/" in "$ROOT"/*) echo "wheel-smoke: $work is inside the repo; pick a folder outside it" >&2; exit 2 ;; esac
unset PYTHONPATH  # nothing of the checkout may be importable: only the installed wheel

echo "wheel-smoke: building the wheel in $work"
# From a copy of the files git tracks or would track: a stale build/ folder of an earlier in-tree build
# (setuptools never empties build/lib) cannot leak removed modules into the wheel.
mkdir "$work/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) |
    tar -xf - -C "$work/src"
else
  tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=./mlruns --exclude=./mlflow.db \
    -cf - . | tar -xf - -C "$work/src"
fi
"$PYTHON" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" wheel --quiet --no-deps -w "$work/dist" "$work/src"
wheel=("$work"/dist/tagger-*.whl)

echo "wheel-smoke: installing ${wheel[0]##*/} into a fresh venv"
# torch first, pinned: the CPU build. Left to the resolver, pip would fetch a multi-GB CUDA build.
# --no-compile: half the install's CPU time; the few modules the quickstart imports compile as it runs.
"${pip[@]}" install --quiet --no-compile torch==2.13.0
"${pip[@]}" install --quiet --no-compile "${wheel[0]}"

mkdir "$work/run" && cd "$work/run"
"$work/venv/bin/python" - "$work/venv" <<'EOF'
import sys
from pathlib import Path

import mlflow_model
import tagger
from tagger.config import SHIPPED_DATASET

venv = Path(sys.argv[1]).resolve()
for name, where in (("tagger", tagger.__file__), ("mlflow_model", mlflow_model.__file__), ("dataset", SHIPPED_DATASET)):
    assert Path(where).resolve().is_relative_to(venv), f"{name} comes from {where}, not from the installed wheel"
assert SHIPPED_DATASET.is_file(), SHIPPED_DATASET
print(f"wheel-smoke: tagger, mlflow_model and the shipped dataset come from {venv}")
EOF

echo "wheel-smoke: tagger quickstart from $PWD"
"$work/venv/bin/tagger" quickstart --workdir "$work/store" --num-epochs 1 "$@"
if [ -n "$(ls -A)" ]; then  # everything belongs in --workdir
  echo "wheel-smoke: the quickstart wrote into the folder it ran from, not only into --workdir:" >&2
  find . -maxdepth 4 >&2
  exit 1
fi

echo "wheel-smoke: loading the promoted model from its own files"
"$work/venv/bin/python" - "$work/store" <<'EOF'
import sys
from pathlib import Path

import mlflow
import pandas as pd

store = Path(sys.argv[1]).resolve()
mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
version = mlflow.MlflowClient().get_model_version_by_alias("tagger", "champion")
location = mlflow.get_logged_model(version.source.removeprefix("models:/")).artifact_location  # source: models:/m-...
assert location.removeprefix("file://").startswith(str(store)), f"the model's files are at {location}, not in {store}"
local = Path(mlflow.artifacts.download_artifacts("models:/tagger@champion")).resolve()
code = local / "code" / "mlflow_model"
assert (code / "__init__.py").is_file() and (code / "pyfunc.py").is_file(), f"no runtime package in {code}"
model = mlflow.pyfunc.load_model(str(local))
import mlflow_model  # noqa: E402  (imported by the load above)

assert Path(mlflow_model.__file__).resolve().parent == code, f"the model ran {mlflow_model.__file__}, not {code}"
answer = model.predict(pd.DataFrame({"title": ["BERT for legal text"], "description": ["Fine-tuned on contracts."]}))
assert len(answer) == 1 and isinstance(answer["prediction"].iloc[0], str), answer
print(f"wheel-smoke: the model's code/mlflow_model loads and predicts {answer['prediction'].iloc[0]!r}")
EOF
elapsed=$((SECONDS - started))
echo "wheel-smoke: passed in $((elapsed / 60))m$((elapsed % 60))s"
