"""Promotion, recorded in a `promote-<model>-v<N>` run, and its gate: a challenger replaces the champion
only if its weighted F1 is not worse and its probabilities are not worse calibrated (ECE at most
`ece_tolerance`, 0.02, above the champion's) on the same labelled CSV."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import mlflow
from mlflow.entities import RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from tagger.access import registry_needs, require
from tagger.config import CHAMPION_ALIAS, PRODUCTION_STAGE, EvaluateConfig
from tagger.errors import PromotionRefused, one_line
from tagger.evaluate import evaluate_model, experiment_of
from tagger.records import dataset_name, name_and_describe, promote_run_name
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
    champion_error: str | None = None  # why the champion could not be loaded and scored (then champion_f1 is None)
    challenger_ece: float | None = None
    champion_ece: float | None = None
    shortfalls: str | None = None  # what the challenger does worse ("F1 ...; ECE ..."), when refused or forced


def shortfalls(challenger: dict[str, float], champion: dict[str, float] | None, f1_tolerance: float = 0.0,
               ece_tolerance: float = EvaluateConfig.ece_tolerance) -> list[str]:
    """What the challenger ({"f1", "ece"}) does worse than the champion, beyond the tolerances (none: no champion)."""
    if champion is None:
        return []
    found = []
    if challenger["f1"] < champion["f1"] - f1_tolerance:
        found.append(f"F1 {challenger['f1']:.4f} is below the champion's {champion['f1']:.4f}")
    if challenger.get("ece") is not None and champion.get("ece") is not None \
            and challenger["ece"] > champion["ece"] + ece_tolerance:
        found.append(f"ECE {challenger['ece']:.4f} is more than {ece_tolerance:g} above the champion's "
                     f"{champion['ece']:.4f}")
    return found


def decide(challenger_f1: float, champion_f1: float | None, force: bool, tolerance: float = 0.0,
           challenger_ece: float | None = None, champion_ece: float | None = None,
           ece_tolerance: float = EvaluateConfig.ece_tolerance) -> str:
    """accepted if there is no champion or the challenger is neither less accurate nor worse calibrated;
    else forced or refused."""
    champion = None if champion_f1 is None else {"f1": champion_f1, "ece": champion_ece}
    if not shortfalls({"f1": challenger_f1, "ece": challenger_ece}, champion, tolerance, ece_tolerance):
        return "accepted"
    return "forced" if force else "refused"


def gate_scores(results: dict) -> dict[str, float]:
    """What the gate compares from an evaluation: weighted F1 and ECE."""
    return {"f1": results["overall"]["f1"], "ece": results["calibration"]["ece"]}


def compare(name: str, version: str, dataset_loc: str, force: bool, config: EvaluateConfig) -> GateDecision:
    """Evaluate the challenger (and the champion, if another version) on the same CSV."""
    champion = champion_version(name)
    challenger = gate_scores(evaluate_model(f"models:/{name}/{version}", dataset_loc, config))
    held = champion_error = None
    if champion == version:
        held = challenger
    elif champion is not None:
        try:
            held = gate_scores(evaluate_model(f"models:/{name}/{champion}", dataset_loc, config))
        except Exception as error:  # e.g. its artifacts were moved or deleted: no comparison is possible
            champion_error = one_line(error)
    worse = shortfalls(challenger, held, config.f1_tolerance, config.ece_tolerance)
    decision = "accepted" if not (worse or champion_error) else "forced" if force else "refused"
    return GateDecision(version, challenger["f1"], champion, held["f1"] if held else None, dataset_name(dataset_loc),
                        decision, champion_error, challenger["ece"], held["ece"] if held else None,
                        "; ".join(worse) or None)


def refusal(name: str, decision: GateDecision) -> str:
    """Why the gate kept the champion, in one line."""
    if decision.champion_error:
        return (
            f"the champion ({name} version {decision.champion}) cannot be loaded to compare {name} version "
            f"{decision.challenger} with: {decision.champion_error}; the champion stays (pass --force to promote anyway)"
        )
    return (
        f"{name} version {decision.challenger} has F1 {decision.challenger_f1:.4f} and ECE {decision.challenger_ece:.4f} "
        f"on {decision.dataset}, against the champion (version {decision.champion}) with F1 "
        f"{decision.champion_f1:.4f} and ECE {decision.champion_ece:.4f}: {decision.shortfalls}; the champion stays "
        "(pass --force to promote anyway)"
    )


def tag_value(value: object) -> str:
    """A tag's text: scores with 4 decimals, the rest as it is."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def record(name: str, decision: GateDecision, config: EvaluateConfig) -> None:
    """Tag the challenger version with the gate's comparison (gate.decision, gate.champion_f1, ...)."""
    client = MlflowClient()
    for key, value in asdict(decision).items():
        if key != "challenger" and value is not None:
            client.set_model_version_tag(name, decision.challenger, f"{config.gate_tag_prefix}{key}", tag_value(value))


def describe_promotion(name: str, version: str, previous: str | None, decision: GateDecision | None) -> str:
    """The promote run's description: what was promoted, what it replaced, what the gate found."""
    refused = decision is not None and decision.decision == "refused"
    if refused:
        stays = f"v{previous} stays {PRODUCTION_STAGE} with alias `{CHAMPION_ALIAS}`"
        text = f"Refused to promote **{name} v{version}**; {stays}."
    else:
        replaced = ("no champion before it" if previous is None else "it already was the champion"
                    if previous == version else f"v{previous}, the champion before it, is archived")
        text = f"Promotes **{name} v{version}** to stage {PRODUCTION_STAGE} and alias `{CHAMPION_ALIAS}` ({replaced})."
    if decision is None:
        return text + " Not gated (no evaluation dataset given)."
    champion = (f"v{decision.champion}'s F1 {decision.champion_f1:.4f}, ECE {decision.champion_ece:.4f}"
                if decision.champion_f1 is not None else "no champion")
    if decision.champion_error:
        champion = f"v{decision.champion}, which cannot be loaded ({decision.champion_error})"
    worse = f" ({decision.shortfalls})" if decision.shortfalls else ""
    return (
        f"{text}\n\nGate on `{decision.dataset}`: F1 {decision.challenger_f1:.4f}, ECE {decision.challenger_ece:.4f} "
        f"against {champion}: **{decision.decision}**{worse}. The evaluations are the runs nested under this one."
    )


def record_promotion(run_id: str, name: str, version: str, previous: str | None, decision: GateDecision | None) -> None:
    """Name the promote run and tag it with the version, the previous champion and the gate's result."""
    name_and_describe(run_id, promote_run_name(name, version), describe_promotion(name, version, previous, decision))
    tags = {"model_name": name, "model_version": version, "previous_champion": previous if previous else "none",
            "gate.decision": decision.decision if decision else "not gated"}
    if decision is not None:
        tags |= {f"gate.{k}": v for k, v in asdict(decision).items() if k != "decision" and v is not None}
    MlflowClient().log_batch(run_id, tags=[RunTag(k, tag_value(v)) for k, v in tags.items()])


def gated_promote(
    name: str, version: str | None, dataset_loc: str | None, force: bool = False, config: EvaluateConfig | None = None
) -> tuple[ModelVersion, GateDecision | None]:
    """Promote `version` (default: newest) in a `promote-<model>-v<N>` run; returns it and the gate's decision.

    With dataset_loc the promotion is gated: the version's F1 on it must not be worse than the
    champion's (the evaluations are runs nested in the promote run), else PromotionRefused is raised
    and the champion stays, unless force. Without it (None) there is no gate and no decision.
    """
    config = config or EvaluateConfig()
    version = str(version or newest_version(name))
    previous = champion_version(name)
    experiment = experiment_of(MlflowClient().get_model_version(name, version))
    require(f"promote {name!r}", registry_needs(name, experiment))  # before any evaluation or run
    with mlflow.start_run(experiment_id=experiment, nested=mlflow.active_run() is not None) as run:
        decision = compare(name, version, dataset_loc, force, config) if dataset_loc else None
        if decision is not None:
            record(name, decision, config)
        record_promotion(run.info.run_id, name, version, previous, decision)
        refused = decision is not None and decision.decision == "refused"
        promoted = None if refused else promote(name, version)
    if promoted is None:
        raise PromotionRefused(refusal(name, decision))
    return promoted, decision
