"""Register a logged model as a new version, describe it in the registry, and promote a version (stage + alias).

What a registry user reads: the registered model's description (what it does, inputs, outputs,
params with their defaults, how to load it) and tags; each version's description opens with one
line (training run, encoder, epochs, val_loss, evaluation F1 once known). The package run is
named `package-<model>-v<N>` and the training run is tagged with the versions it became.
"""
from __future__ import annotations

import warnings

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from mlflow_model.checkpoint import LABELS_FILE
from mlflow_model.config import CHECKPOINT_ARTIFACT
from tagger.config import CHAMPION_ALIAS, PRODUCTION_STAGE, EvaluateConfig
from tagger.errors import RunSelectionError
from tagger.records import package_run_name, plural, run_link, set_note, version_link

VERSIONS_TAG = "registered_versions"  # training run tag: the versions it became ("tagger v3, tagger v4")
REGISTERED_AS = "**Registered as**: "  # the training run's description ends with links to those versions
HEADLINE_END = "\n\n"  # a version description: the headline, a blank line, the details


def selection_of(tags: dict[str, str]) -> tuple[str, str]:
    """(metric, mode) a version's checkpoint was chosen by: its `selected_by` tag, else val_loss ASC."""
    metric, mode = (tags.get("selected_by") or "val_loss ASC").split()
    return metric, mode


def version_headline(tags: dict[str, str]) -> str:
    """One readable line from a version's tags: its scores (evaluation F1 once known, val_loss), then its training."""
    metric, prefix = selection_of(tags)[0], EvaluateConfig().tag_prefix
    f1, dataset, ece = tags.get(f"{prefix}f1"), tags.get(f"{prefix}dataset", "?"), tags.get(f"{prefix}ece")
    experiment, run = tags.get(f"{prefix}experiment_id"), tags.get(f"{prefix}run_id")
    report = f" ({run_link(experiment, run, 'evaluation report')})" if experiment and run else ""
    scores = [f"F1 {float(f1):.4f}{f', ECE {float(ece):.4f}' if ece else ''} on {dataset}{report}"] if f1 else []
    scores += [f"{metric} {float(tags[metric]):.4f}"] if tags.get(metric) else []
    evaluated = "" if f1 else " (not evaluated yet)"
    trained = f"{tags['encoder']} fine-tuned" if tags.get("encoder") else "fine-tuned"
    epochs = f" for {plural(tags['num_epochs'], 'epoch')}" if tags.get("num_epochs") else ""
    run = f" in run `{tags['training_run']}`" if tags.get("training_run") else ""
    return f"{', '.join(scores) or 'no scores'}{evaluated} — {trained}{epochs}{run}."


def version_description(tags: dict[str, str], details: list[str]) -> str:
    """The headline, then the details as a markdown list."""
    return version_headline(tags) + HEADLINE_END + "\n".join(f"- {line}" for line in details)


def refresh_headline(name: str, version: str) -> ModelVersion:
    """Rewrite the first line of a version's description from its current tags (e.g. after an evaluation)."""
    client = MlflowClient()
    current = client.get_model_version(name, version)
    head, found, details = (current.description or "").partition(HEADLINE_END)
    details = details if found else head  # a description written by someone else is kept below the headline
    description = version_headline(current.tags) + (HEADLINE_END + details if details else "")
    return client.update_model_version(name, version, description=description)


def _labels(version: ModelVersion) -> list[str]:
    """The tags a version answers, from the label map in its artifacts (empty if it cannot be read)."""
    uri = f"models:/{version.name}/{version.version}/artifacts/{CHECKPOINT_ARTIFACT}/{LABELS_FILE}"
    try:
        class_to_index = mlflow.artifacts.load_dict(uri)
    except (MlflowException, OSError, ValueError):  # e.g. a model not packaged by tagger
        return []
    return sorted(class_to_index, key=class_to_index.get)


def _param_defaults(name: str, version: str) -> dict[str, object]:
    """The params of a version's signature with their packaged defaults."""
    signature = mlflow.models.get_model_info(f"models:/{name}/{version}").signature
    return {spec.name: spec.default for spec in signature.params.params} if signature and signature.params else {}


def model_description(name: str, version: str, labels: list[str], params: dict[str, object]) -> str:
    """What the registered model does, its inputs, outputs and params, and how to load it (markdown)."""
    answers = ", ".join(f"`{label}`" for label in labels) or "one of the tags it was trained on"
    param_text = "; ".join(f"`{k}` (default {v})" for k, v in params.items()) or "none"
    return (
        f"Tags an ML project from its title and description: answers one of {answers}.\n\n"
        "- **Input**: a DataFrame (or JSON `dataframe_records` / `dataframe_split`) with string columns "
        "`title` and `description` (a null description reads as empty).\n"
        "- **Output**: one row per input row: `prediction` (the tag) and `probabilities` (tag -> probability).\n"
        f"- **Params** (per request, defaults as packaged in version {version}): {param_text}. Below `threshold`, "
        "the top probability gives `other`.\n"
        f"- **Load**: `mlflow.pyfunc.load_model(\"models:/{name}@{CHAMPION_ALIAS}\")`, or serve it: "
        f"`mlflow models serve -m models:/{name}@{CHAMPION_ALIAS} --env-manager local`.\n"
        f"- **Versions**: each is packaged by `tagger package` from the best training run; `@{CHAMPION_ALIAS}` "
        f"(stage {PRODUCTION_STAGE}) is the one `tagger promote` made the one to serve."
    )


def describe_registered_model(name: str, version: ModelVersion) -> None:
    """Set the registered model's description and tags from its newest version."""
    client = MlflowClient()
    labels, params = _labels(version), _param_defaults(name, version.version)
    client.update_registered_model(name, description=model_description(name, version.version, labels, params))
    tags = {
        "task": "text classification: the tag of an ML project",
        "input": "title, description (strings)",
        "output": "prediction, probabilities",
        "labels": ", ".join(labels),
        "params": ", ".join(f"{k}={v}" for k, v in params.items()),
        "serve": f"models:/{name}@{CHAMPION_ALIAS}",
    }
    for key, value in tags.items():
        if value:
            client.set_registered_model_tag(name, key, value)


def package_note(version: ModelVersion) -> str:
    """The package run's description: which training run it packaged, how, as which version."""
    tags = version.tags
    source = f"training run `{tags['training_run']}`" if tags.get("training_run") else "a training run"
    chosen = f" (the best of its experiment by {tags['selected_by']})" if tags.get("selected_by") else ""
    build = " ".join(tags[k] for k in ("engine", "precision") if tags.get(k))
    encoder = f" with the encoder {tags['encoder']}" if tags.get("encoder") else ""
    return (
        f"Packages the checkpoint of {source}{chosen}{encoder} as an MLflow pyfunc{f' ({build})' if build else ''} "
        f"and registers it as **{version.name} v{version.version}**."
    )


def link_runs(version: ModelVersion, model_id: str | None = None) -> None:
    """Name the package run after the version; link the training run to the model (the run page then lists it
    among its logged and registered models), tag it with the versions it became and say so in its description."""
    from mlflow.entities import LoggedModelOutput

    client = MlflowClient()
    if version.run_id:
        client.update_run(version.run_id, name=package_run_name(version.name, version.version))
        client.set_tag(version.run_id, "model_name", version.name)
        client.set_tag(version.run_id, "model_version", str(version.version))
        set_note(client, version.run_id, package_note(version))
    training_run = version.tags.get("source_run_id")
    if training_run:
        if model_id:
            client.log_outputs(training_run, [LoggedModelOutput(model_id, 0)])
        run = client.get_run(training_run)
        versions = [v for v in run.data.tags.get(VERSIONS_TAG, "").split(", ") if v]
        versions.append(f"{version.name} v{version.version}")
        client.set_tag(training_run, VERSIONS_TAG, ", ".join(versions))
        note, _, _ = run.data.tags.get(MLFLOW_RUN_NOTE, "").partition(REGISTERED_AS)
        links = ", ".join(version_link(*v.rsplit(" v", 1)) for v in versions)
        set_note(client, training_run, f"{note.rstrip()}\n\n{REGISTERED_AS}{links}".lstrip())


def register_version(
    model_uri: str, name: str, tags: dict[str, str], description: str, model_id: str | None = None
) -> ModelVersion:
    """A new version of `name` (created if needed) with tags and a description; the registered model's
    description follows it, its package run is named after it and its training run tagged with it."""
    version = mlflow.register_model(model_uri, name, tags={k: v for k, v in tags.items() if v not in ("", None)})
    version = MlflowClient().update_model_version(name, version.version, description=description)
    describe_registered_model(name, version)
    link_runs(version, model_id)
    return version


def newest_version(name: str) -> str:
    """The highest version number of a registered model."""
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    if not versions:
        raise RunSelectionError(f"registered model {name!r} has no versions; run the package command first")
    return str(max(int(v.version) for v in versions))


def archive_other_production_versions(client: MlflowClient, name: str, version: str) -> None:
    """Move every other Production version of `name` to Archived.

    Not archive_existing_versions=True: a tracking server on PostgreSQL fails it (MLflow 3.17 compares
    its integer version column with the version string: "operator does not exist: integer <> character varying").
    """
    for other in client.search_model_versions(f"name = '{name}'"):
        if other.current_stage == PRODUCTION_STAGE and str(other.version) != version:
            client.transition_model_version_stage(name, other.version, "Archived")


def promote(name: str, version: str | None = None) -> ModelVersion:
    """Make a version the one served: stage Production (archiving the previous) and alias champion."""
    client = MlflowClient()
    version = str(version or newest_version(name))
    with warnings.catch_warnings():  # stages are deprecated in favour of aliases; we keep both working
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, PRODUCTION_STAGE)
        archive_other_production_versions(client, name, version)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return client.get_model_version(name, version)


def champion_version(name: str) -> str | None:
    """The version the champion alias points to (a string, as versions are named), or None when there is none yet."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException as error:  # no such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
