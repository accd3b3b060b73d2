"""Read and write the checkpoint layout: weights, args.json and the label map.

Layout (Made With ML's Ray checkpoint, which tagger's trainer also writes):
- `model.safetensors` and/or `model.pt`: state dict of FinetunedLLM;
- `args.json`: `dropout_p`, `embedding_dim`, `num_classes`;
- `class_to_index.json`, or `.metadata.json` holding `class_to_index` (Ray <= 2.7);
- `calibration.json` (optional): `temperature`, the number the logits are divided by before the
  softmax, and how it was fitted. Without it (Made With ML's checkpoints, older runs) T = 1.
Weights are never unpickled: safetensors, or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow_model.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where weights are read or written: an ONNX model never needs it
    import torch

    from mlflow_model.model import FinetunedLLM

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "model.pt"
ARGS_FILE = "args.json"
LABELS_FILE = "class_to_index.json"
CALIBRATION_FILE = "calibration.json"
RAY_METADATA_FILE = ".metadata.json"
# Buffers that older transformers saved in the state dict and newer ones rebuild themselves.
_IGNORED_KEYS = ("llm.embeddings.position_ids",)


@dataclass(frozen=True)
class ModelArgs:
    """Constructor arguments of FinetunedLLM, stored as args.json beside the weights."""

    dropout_p: float
    embedding_dim: int
    num_classes: int


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, loaded."""

    state_dict: dict[str, torch.Tensor]
    args: ModelArgs
    class_to_index: dict[str, int]


def _read_json(path: Path) -> dict:
    """A JSON object from a file, or a CheckpointError saying what is wrong."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return value


def read_args(folder: Path) -> ModelArgs:
    """args.json as ModelArgs."""
    values = _read_json(folder / ARGS_FILE)
    try:
        return ModelArgs(
            dropout_p=float(values["dropout_p"]),
            embedding_dim=int(values["embedding_dim"]),
            num_classes=int(values["num_classes"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / ARGS_FILE} needs dropout_p, embedding_dim, num_classes: {error}") from error


def read_class_to_index(folder: Path) -> dict[str, int]:
    """The label map, from class_to_index.json or Ray's .metadata.json."""
    if (folder / LABELS_FILE).is_file():
        labels = _read_json(folder / LABELS_FILE)
    elif (folder / RAY_METADATA_FILE).is_file():
        labels = _read_json(folder / RAY_METADATA_FILE).get("class_to_index")
    else:
        labels = None
    if not labels:
        raise CheckpointError(
            f"no label map in {folder}: expected {LABELS_FILE} or {RAY_METADATA_FILE} with 'class_to_index'"
        )
    indices = sorted(int(i) for i in labels.values())
    if indices != list(range(len(labels))):
        raise CheckpointError(f"class_to_index in {folder} must map tags to 0..{len(labels) - 1}, got {labels}")
    return {str(tag): int(index) for tag, index in labels.items()}


def read_temperature(folder: str | Path) -> float:
    """The checkpoint's temperature (calibration.json), 1.0 when it has none; CheckpointError if not a number > 0."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    value = _read_json(path).get("temperature")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise CheckpointError(f"{path}: 'temperature' must be a number > 0, got {value!r}")
    return float(value)


def write_calibration(folder: str | Path, temperature: float, **details: Any) -> Path:
    """Write calibration.json: the temperature and how it was chosen (fitted on what, ECE before/after...)."""
    if not 0 < temperature < float("inf"):
        raise CheckpointError(f"a temperature must be a number > 0, got {temperature!r}")
    path = Path(folder) / CALIBRATION_FILE
    path.write_text(json.dumps({"temperature": float(temperature), **details}, indent=2))
    return path


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights without unpickling: safetensors first, else torch.load(weights_only=True)."""
    import torch
    from safetensors.torch import load_file

    try:
        if (folder / SAFETENSORS_FILE).is_file():
            state = load_file(folder / SAFETENSORS_FILE)
        elif (folder / TORCH_FILE).is_file():
            state = torch.load(folder / TORCH_FILE, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"no weights in {folder}: expected {SAFETENSORS_FILE} or {TORCH_FILE}")
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt file or a pickle that is not plain tensors
        raise CheckpointError(f"cannot load weights from {folder}: {error}") from error
    return {k: v for k, v in state.items() if k not in _IGNORED_KEYS}


def read_labels(folder: str | Path) -> tuple[ModelArgs, dict[str, int]]:
    """args.json and the label map of a checkpoint folder, checked against each other (no weights read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    args, labels = read_args(folder), read_class_to_index(folder)
    if len(labels) != args.num_classes:
        raise CheckpointError(
            f"{folder}: args.json says num_classes={args.num_classes} but the label map has {len(labels)} tags"
        )
    return args, labels


def index_to_class(folder: str | Path) -> list[str]:
    """Tag of each output index, from the checkpoint's label map (checked against args.json)."""
    _, labels = read_labels(folder)
    return [tag for tag, _ in sorted(labels.items(), key=lambda item: item[1])]


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Load a checkpoint folder and check that its parts agree."""
    args, labels = read_labels(folder)
    return Checkpoint(read_state_dict(Path(folder)), args, labels)


def encoder_settings(encoder_dir: str | Path) -> dict[str, Any]:
    """The encoder's config.json (pad id, position limit, heads) as a dict, read without transformers."""
    return _read_json(Path(encoder_dir) / "config.json")


def encoder_max_length(encoder_dir: str | Path) -> int:
    """Longest input the encoder takes: its tokenizer's limit, capped by its position embeddings."""
    limits = [encoder_settings(encoder_dir).get("max_position_embeddings") or 512]
    tokenizer_config = Path(encoder_dir) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        limit = _read_json(tokenizer_config).get("model_max_length")
        if isinstance(limit, int) and limit < 10**6:  # transformers writes 1e30 for "no limit"
            limits.append(limit)
    return int(min(limits))


def load_finetuned(checkpoint_dir: str | Path, encoder_dir: str | Path) -> FinetunedLLM:
    """The trained FinetunedLLM: the encoder's architecture (config.json) with the checkpoint's weights.

    The checkpoint's tensors become the parameters (assign=True): safetensors memory-maps the file,
    so pages are read as they are used and the workers of one server share them.
    """
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from mlflow_model.model import build_model

    checkpoint = read_checkpoint(checkpoint_dir)
    with no_init_weights():  # every weight comes from the checkpoint: no random init to throw away
        model = build_model(AutoConfig.from_pretrained(encoder_dir, local_files_only=True), checkpoint.args)
    try:
        missing, unexpected = model.load_state_dict(as_model_dtypes(checkpoint.state_dict, model), strict=False,
                                                    assign=True)
    except RuntimeError as error:  # tensor shapes differ: another encoder than the one trained
        raise CheckpointError(f"weights in {checkpoint_dir} do not fit the encoder in {encoder_dir}: {error}") from error
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {checkpoint_dir} do not fit the encoder in {encoder_dir}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def as_model_dtypes(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor in its parameter's dtype: assign=True keeps the tensor it is given."""
    expected = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    return {name: t.to(expected[name]) if name in expected and t.dtype != expected[name] else t
            for name, t in state.items()}


def write_checkpoint(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    args: ModelArgs,
    class_to_index: dict[str, int],
    torch_format: bool = False,
) -> Path:
    """Write the layout: model.safetensors (and model.pt if asked), args.json, class_to_index.json."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, folder / SAFETENSORS_FILE)
    if torch_format:
        torch.save(tensors, folder / TORCH_FILE)
    (folder / ARGS_FILE).write_text(json.dumps(asdict(args), indent=2))
    (folder / LABELS_FILE).write_text(json.dumps(class_to_index, indent=2))
    return folder
