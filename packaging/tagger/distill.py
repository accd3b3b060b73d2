"""Distil a registered teacher into a student with fewer encoder layers, trained as an ordinary run on Ray Train.

The student is the teacher's encoder with `layers` of its layers (evenly spaced, the last one
kept), its embeddings, pooler and head: initialised from the teacher, not from scratch. Its
encoder folder (config with the fewer layers, tokenizer, initial weights) is logged with the run
under `encoder/` and the run is tagged `encoder_artifact`, so that `tagger package` builds the
student's architecture. The teacher's logits of the training rows are computed once, on the
driver, and the loop trains on them and the true tags (`tagger.train_loop.make_loss`). Everything
else is `tagger.train.train`: the same split, metrics, checkpoint and ranking; the run's
`distill.*` tags name its teacher (model version and training run).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_model.config import ENCODER_ARTIFACT
from tagger.config import DISTILL_TAG_PREFIX, ENCODER_ARTIFACT_TAG, DistillConfig
from tagger.errors import OptionError, RunSelectionError
from tagger.registry import selection_of
from tagger.runs import fetch_checkpoint
from tagger.train import TrainResult, train

TEACHER_BATCH_ROWS = 64  # rows per forward pass when the teacher labels the training rows


def teacher_version(uri: str) -> ModelVersion:
    """The registered version a `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME/STAGE` URI names."""
    client = MlflowClient()
    name, _, rest = uri.removeprefix("models:/").partition("/")
    try:
        if not uri.startswith("models:/"):
            raise OptionError(f"--teacher must be a registered model URI (models:/NAME@ALIAS or models:/NAME/N), got {uri!r}")
        if "@" in name:
            model, alias = name.split("@", 1)
            return client.get_model_version_by_alias(model, alias)
        if rest.isdigit():
            return client.get_model_version(name, rest)
        versions = client.get_latest_versions(name, [rest]) if rest else []
        if not versions:
            raise OptionError(f"--teacher {uri!r}: no version of {name!r} is in stage {rest!r}")
        return versions[0]
    except MlflowException as error:
        if isinstance(error, OptionError):
            raise
        raise OptionError(f"--teacher {uri!r} names no registered version: {error.message}") from error


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher layer each student layer starts as: evenly spaced, the last one kept (3 of 6: 1, 3, 5)."""
    if not 1 <= student_layers <= teacher_layers:
        raise OptionError(f"--layers must be between 1 and the teacher's {teacher_layers} layers, got {student_layers}")
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def load_teacher(version: ModelVersion, folder: Path) -> tuple[Any, Path, str, dict[str, int]]:
    """(the teacher's FinetunedLLM, its encoder folder, its training run id, its label map), from the registry
    (the packaged encoder config and tokenizer, whatever the build) and its training run (the checkpoint)."""
    from mlflow_model.checkpoint import load_finetuned, read_class_to_index

    run_id = version.tags.get("source_run_id")
    if not run_id:
        raise RunSelectionError(f"version {version.version} of {version.name} has no source_run_id tag: was it packaged "
                                "by `tagger package`?")
    model = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}",
                                                     dst_path=str(folder / "teacher")))
    _, checkpoint = fetch_checkpoint(run_id, *selection_of(version.tags), folder / "teacher-checkpoint")  # as packaged
    encoder = model / "artifacts" / ENCODER_ARTIFACT
    return load_finetuned(checkpoint, encoder), encoder, run_id, read_class_to_index(checkpoint)


def student_encoder(teacher: Any, teacher_encoder: Path, layers: list[int], out: Path) -> Path:
    """A pretrained-format encoder folder: the teacher's config with fewer layers, its tokenizer, and the
    teacher's embeddings, chosen layers and pooler as weights."""
    import copy

    from transformers import AutoModel, AutoTokenizer

    config = copy.deepcopy(teacher.llm.config)
    config.num_hidden_layers = len(layers)
    config._name_or_path = ""  # the run's `encoder` is then the folder's name
    student = AutoModel.from_config(config)
    state = {k: v for k, v in teacher.llm.state_dict().items() if not k.startswith("encoder.layer.")}
    for new, old in enumerate(layers):
        prefix = f"encoder.layer.{old}."
        state |= {f"encoder.layer.{new}.{k[len(prefix):]}": v for k, v in teacher.llm.state_dict().items()
                  if k.startswith(prefix)}
    student.load_state_dict(state, strict=True)
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_encoder).save_pretrained(out)
    return out


def teacher_columns(teacher_labels: dict[str, int], data_labels: dict[str, int]) -> list[int]:
    """The teacher's output column of each of the student's tags (the data's label map); OptionError if the tags
    differ (the teacher's logits would mean other tags)."""
    if set(teacher_labels) != set(data_labels):
        raise OptionError(f"the dataset's tags {sorted(data_labels)} differ from the teacher's {sorted(teacher_labels)}: "
                          "distil on data with the teacher's tags")
    return [teacher_labels[tag] for tag in sorted(data_labels, key=data_labels.__getitem__)]


def teacher_extras(
    teacher: Any, labels: dict[str, int], config: DistillConfig
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The loop config entries distillation adds, from the tokenized data (tagger.train.train's `loop_extras`):
    the teacher's logits of the training rows, alpha, the soft-label temperature and the teacher's head."""
    import torch

    from mlflow_model.batching import batched_logits
    from tagger.train_loop import DISTILL_ALPHA_KEY, DISTILL_TEMPERATURE_KEY, INIT_HEAD_KEY, TEACHER_LOGITS_KEY

    def extras(data: dict[str, Any]) -> dict[str, Any]:
        order = teacher_columns(labels, data["class_to_index"])

        def logits(input_ids, mask):  # noqa: ANN001, ANN202
            with torch.inference_mode():
                return teacher(torch.from_numpy(input_ids), torch.from_numpy(mask)).float().numpy()

        teacher_logits = batched_logits(logits, data["train_ids"], TEACHER_BATCH_ROWS, int(data["pad_id"]))[:, order]
        head = {"weight": teacher.fc1.weight.detach()[order].tolist(), "bias": teacher.fc1.bias.detach()[order].tolist()}
        return {TEACHER_LOGITS_KEY: teacher_logits.tolist(), DISTILL_ALPHA_KEY: config.alpha,
                DISTILL_TEMPERATURE_KEY: config.soft_temperature, INIT_HEAD_KEY: head}

    return extras


def distill(config: DistillConfig, run_name: str | None = None) -> TrainResult:
    """Train a student of the teacher version on Ray Train; one ordinary training run, tagged with its teacher."""
    if config.train.base_model:
        raise OptionError("--base-model does not apply to distill: the student's encoder is the teacher's, with fewer layers")
    version = teacher_version(config.teacher)
    with tempfile.TemporaryDirectory(prefix="tagger-distill-") as tmp:
        teacher, encoder, teacher_run, labels = load_teacher(version, Path(tmp))
        teacher_layers = int(teacher.llm.config.num_hidden_layers)
        layers = layer_map(teacher_layers, config.layers)
        teacher_name = version.tags.get("encoder", "encoder").rstrip("/").rsplit("/", 1)[-1]
        folder = student_encoder(teacher, encoder, layers, Path(tmp) / f"{teacher_name}-student-L{config.layers}")
        links = {
            "teacher": f"{version.name} version {version.version}", "teacher_model": version.name,
            "teacher_version": str(version.version), "teacher_run_id": teacher_run, "teacher_uri": config.teacher,
            "layers": f"{config.layers} of {teacher_layers}", "layer_map": ",".join(map(str, layers)),
            "alpha": str(config.alpha), "soft_temperature": str(config.soft_temperature),
        }
        tags = {ENCODER_ARTIFACT_TAG: ENCODER_ARTIFACT} | {f"{DISTILL_TAG_PREFIX}{k}": v for k, v in links.items()}
        run_name = run_name or f"distill-L{config.layers}-from-{version.name}-v{version.version}"
        return train(config.train.replace(base_model=str(folder)), run_name=run_name, tags=tags,
                     artifacts={ENCODER_ARTIFACT: str(folder)}, loop_extras=teacher_extras(teacher, labels, config))
