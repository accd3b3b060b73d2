"""The promotion gate: a challenger replaces the champion only if its F1 is not worse."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from tagger.config import EvaluateConfig
from tagger.errors import PromotionRefused
from tagger.evaluate import evaluate_model
from tagger.registry import champion_version, newest_version, promote


@dataclass(frozen=True)
class GateDecision:
    """What the gate compared on which dataset, and what it decided."""

    challenger: str
    challenger_f1: float
    champion: str | None  # None: no champion yet
    champion_f1: float | None
    dataset: str
    decision: str  # "accepted", "refused" or "forced"


def decide(challenger_f1: float, champion_f1: float | None, force: bool, tolerance: float = 0.0) -> str:
    """accepted if there is no champion or the challenger is not worse; else forced or refused."""
    if champion_f1 is None or challenger_f1 >= champion_f1 - tolerance:
        return "accepted"
    return "forced" if force else "refused"


def compare(name: str, version: str, dataset_loc: str, force: bool, config: EvaluateConfig) -> GateDecision:
    """Evaluate the challenger (and the champion, if another version) on the same CSV."""
    champion = champion_version(name)
    challenger_f1 = evaluate_model(f"models:/{name}/{version}", dataset_loc, config)["overall"]["f1"]
    champion_f1 = None
    if champion is not None:
        champion_f1 = (
            challenger_f1 if champion == version
            else evaluate_model(f"models:/{name}/{champion}", dataset_loc, config)["overall"]["f1"]
        )
    decision = decide(challenger_f1, champion_f1, force, config.f1_tolerance)
    return GateDecision(version, challenger_f1, champion, champion_f1, dataset_loc, decision)


def record(name: str, decision: GateDecision, config: EvaluateConfig) -> None:
    """Tag the challenger version with the gate's comparison (gate.decision, gate.champion_f1, ...)."""
    client = MlflowClient()
    for key, value in asdict(decision).items():
        if key != "challenger" and value is not None:
            client.set_model_version_tag(name, decision.challenger, f"{config.gate_tag_prefix}{key}", str(value))


def gated_promote(
    name: str, version: str | None, dataset_loc: str, force: bool = False, config: EvaluateConfig | None = None
) -> tuple[ModelVersion, GateDecision]:
    """Promote `version` (default: newest) only if its F1 on dataset_loc is not worse than the champion's.

    Raises PromotionRefused (champion unchanged) when it is worse and force is False.
    """
    config = config or EvaluateConfig()
    version = str(version or newest_version(name))
    decision = compare(name, version, dataset_loc, force, config)
    record(name, decision, config)
    if decision.decision == "refused":
        raise PromotionRefused(
            f"{name} version {version} has F1 {decision.challenger_f1:.4f} on {dataset_loc}, worse than the "
            f"champion (version {decision.champion}) with {decision.champion_f1:.4f}; the champion stays "
            "(pass --force to promote anyway)"
        )
    return promote(name, version), decision
