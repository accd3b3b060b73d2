"""The engine registry: every engine, its precisions, its forward paths, what its served model imports.

An engine turns padded int64 (input_ids, attention_mask) batches into float32 logits. Each one is
a module of this package, named by its entry in `ENGINES`, with two functions; the module is
imported only when its engine is used, so a served ONNX model never imports torch:

- `load(checkpoint_dir, encoder_dir, config) -> Engine`: at load, on the inference thread that
  will run it; it runs exactly the forward path recorded in `config.forward`, or raises
  CheckpointError naming the file and the reason;
- `build(files, out_dir, config, samples, calibration) -> (files, config)`: at packaging, it makes
  and checks the engine's files from the staged torch checkpoint and records the forward path it
  runs; `calibration` (token ids of training rows) is what a static int8 build sets its scales on.

Everything else (config checks, the CLI's `--build` choices, the model's pip requirements) is
derived from `ENGINES`. Adding an engine is one module here and one entry below.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from mlflow_model.config import PredictorConfig

REFERENCE_BUILD = ("torch", "fp32")  # every other build is measured against it
# Precisions: fp32; bf16; int8 (static: activation scales calibrated at packaging, stored in the model, so a row's
# answer is the same whatever it is batched with); int8-dynamic (activation scales computed per batch: an answer
# depends on the other rows of its batch). Models packaged before static int8 existed read as int8-dynamic.
STATIC_INT8, DYNAMIC_INT8 = "int8", "int8-dynamic"


class Engine(Protocol):
    """Runs one padded batch of token ids through the classifier."""

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, alone: bool = False) -> np.ndarray:
        """int64 (rows x width) in, float32 (rows x classes) out; `alone`: no other pass runs, every core of the
        model is free (an engine may use them all; the answer must not change)."""
        ...


class EngineModule(Protocol):
    """What an engine's module provides (see the module docstring)."""

    def load(self, checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig) -> Engine: ...

    def build(
        self, files: dict[str, str], out_dir: Path, config: PredictorConfig, samples: list[list[list[int]]],
        calibration: list[list[int]] | None = None,
    ) -> tuple[dict[str, str], PredictorConfig]: ...


@dataclass(frozen=True)
class EngineSpec:
    """One engine: the module that loads and builds it, and what a build of it may be."""

    module: str  # import name of the engine's module
    precisions: tuple[str, ...]
    forwards: tuple[str, ...]  # forward paths a build may record; build() picks one at packaging
    requirements: tuple[str, ...]  # distributions the served model imports (pinned at packaging)
    onednn_cached_kernels: Mapping[str, int] = field(default_factory=dict)  # per precision; torch engines only


ENGINES: dict[str, EngineSpec] = {
    "torch": EngineSpec(
        module="mlflow_model.engines.torch_engine",
        precisions=("fp32", "bf16", "int8-dynamic"),
        forwards=("shipped_trace", "trace_at_load", "eager"),
        requirements=("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas"),
        # oneDNN kernels one forward pass reuses across its layers (fp32/int8-dynamic: GELU's; bf16 also its matmuls).
        # oneDNN's default keeps 1024, one per batch shape a server meets: memory then grows with traffic.
        onednn_cached_kernels={"fp32": 4, "int8-dynamic": 4, "bf16": 32},
    ),
    "onnx": EngineSpec(
        module="mlflow_model.engines.onnx_engine",
        precisions=("fp32", "int8", "int8-dynamic"),
        forwards=("graph",),
        requirements=("mlflow", "onnxruntime", "tokenizers", "numpy", "pandas"),
    ),
}


def build_name(engine: str, precision: str) -> str:
    """`torch-fp32`: how the CLI and the records name a build."""
    return f"{engine}-{precision}"


def split_build(name: str) -> tuple[str, str]:
    """(engine, precision) of a build name such as `onnx-int8` or `onnx-int8-dynamic` (engine names have no dash)."""
    engine, _, precision = name.partition("-")
    return engine, precision


def build_names() -> list[str]:
    """Every build that exists, the reference first."""
    return [build_name(engine, precision) for engine, spec in ENGINES.items() for precision in spec.precisions]


def build_problem(engine: str, precision: str, forward: str | None = None) -> str | None:
    """Why engine x precision (x forward path) is not a build, naming the ones that are; None if it is."""
    if engine not in ENGINES:
        return f"unknown engine {engine!r}; the engines are {sorted(ENGINES)}"
    spec = ENGINES[engine]
    if precision not in spec.precisions:
        return f"engine {engine!r} has no {precision!r} build; the builds are {', '.join(build_names())}"
    if forward is not None and forward not in spec.forwards:
        return f"engine {engine!r} has no forward path {forward!r}; it runs one of {list(spec.forwards)}"
    return None


def engine_module(engine: str) -> EngineModule:
    """The module of a registered engine, imported now (its heavy imports stay inside its functions)."""
    module: ModuleType = importlib.import_module(ENGINES[engine].module)
    return module  # type: ignore[return-value]
