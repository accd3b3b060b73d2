"""What checking a model's signature costs: verify, sign, download + verify, against the manifest check.

    python benchmarks/signing.py --tracking-uri sqlite:///$PWD/mlflow.db \
        --model-uri models:/tagger@champion --repeats 5 --out outputs/signing.json

The model's own files are downloaded once (as `tagger fetch` does) and signed with a throwaway key
pair, once per hashing option of model-signing: tagger's (BLAKE3 per file) and the library's default
(SHA-256 per file), each verified --repeats times in this process. Also timed: the integrity
manifest check that `load_context` always runs (SHA-256 of the artifact files), a whole
`fetch_verified` (download + verify, what `tagger serve` and `tagger batch-predict` add before a load
when a key is set), and `import model_signing` in a fresh process (paid once per process). Prints
the load average and a markdown table (medians, and the slowest run), writes JSON.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

TAGGER_HASH = "blake3"  # what tagger signs with (mlflow_model.signature.HASH_ALGORITHM); checked below
COMPARED_HASH = "sha256"  # model-signing's default


def timed(action: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of action."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float]) -> dict[str, float]:
    """Median and slowest run, in seconds."""
    return {"median_s": round(statistics.median(seconds), 3), "max_s": round(max(seconds), 3)}


def import_seconds() -> float:
    """Seconds `import model_signing` takes in a fresh process (it pulls in sigstore)."""
    code = "import time; t = time.perf_counter(); import model_signing; print(time.perf_counter() - t)"
    return round(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout), 3)


def library_config(model_signing, algorithm: str):
    """model-signing's hashing config with tagger's ignored paths, and another hash per file."""
    from mlflow_model.signature import SIGNATURE_FILE

    return (model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)
            .use_file_serialization(hashing_algorithm=algorithm))


def measure(model_uri: str, repeats: int, work: Path) -> dict:
    """Every timing of one model; its size and file count."""
    import model_signing

    from mlflow_model.signature import HASH_ALGORITHM, SIGNATURE_FILE, verify_model
    from tagger.bundle import verify_folder
    from tagger.signing import download_model, fetch_verified, generate_key_pair, public_key_of, sign_folder

    assert HASH_ALGORITHM == TAGGER_HASH, HASH_ALGORITHM
    private, public = generate_key_pair(work / "keys")
    key = public_key_of(private)
    local = download_model(model_uri, work / "download")
    files = [p for p in local.rglob("*") if p.is_file() and p.name != SIGNATURE_FILE]
    rows = {"model": {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 1e6, 1)}}
    rows["import model_signing (fresh process)"] = {"median_s": import_seconds(), "max_s": None}
    rows[f"sign, {TAGGER_HASH} (tagger)"] = summary(timed(lambda: sign_folder(local, private), repeats))
    rows[f"verify, {TAGGER_HASH} (tagger)"] = summary(timed(lambda: verify_model(local, key), repeats))
    other = Path(shutil.copytree(local, work / COMPARED_HASH))
    (other / SIGNATURE_FILE).unlink()
    signer = model_signing.signing.Config().use_elliptic_key_signer(private_key=private)
    rows[f"sign, {COMPARED_HASH}"] = summary(timed(
        lambda: signer.set_hashing_config(library_config(model_signing, COMPARED_HASH)).sign(other, other / SIGNATURE_FILE),
        repeats))
    verifier = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public)
    rows[f"verify, {COMPARED_HASH}"] = summary(timed(
        lambda: verifier.set_hashing_config(library_config(model_signing, COMPARED_HASH)).verify(other, other / SIGNATURE_FILE),
        repeats))
    rows["manifest check, sha256 (load_context, always)"] = summary(timed(lambda: verify_folder(local), repeats))

    def fetch() -> None:
        shutil.rmtree(fetch_verified(str(local), key))

    rows[f"download (copy) + verify, {TAGGER_HASH}"] = summary(timed(fetch, repeats))
    return rows


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


@click.command()
@click.option("--tracking-uri", default=None, help="MLflow tracking store (default: MLFLOW_TRACKING_URI).")
@click.option("--model-uri", required=True, help="A packaged tagger model: models:/..., runs:/... or a folder.")
@click.option("--repeats", default=5, show_default=True, help="Runs of each timing (median and slowest reported).")
@click.option("--out", default=None, help="Write the results as JSON here.")
def main(tracking_uri: str | None, model_uri: str, repeats: int, out: str | None) -> None:
    """Time signing and verifying a packaged model with each hashing option."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="signing-bench-") as tmp:
        rows = measure(model_uri, repeats, Path(tmp))
    model = rows.pop("model")
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} CPUs, "
          f"load average before {load[0]:.2f}; {model_uri}: {model['files']} files, {model['mb']} MB")
    print("| step | median s | slowest s |\n| --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['median_s']} | {'-' if row['max_s'] is None else row['max_s']} |")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"model_uri": model_uri, "model": model, "load_average": load, **rows}, indent=1))


if __name__ == "__main__":
    main()
