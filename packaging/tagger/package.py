"""The package job: best run -> its checkpoint -> pyfunc model -> new registered version."""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mlflow_model.engines import STATIC_INT8, build_name
from mlflow_model.signature import FINGERPRINT_METADATA, fingerprint
from tagger.access import registry_needs, require
from tagger.builds import accuracy_change, f1_metrics, is_reference, make_build, training_rows
from tagger.bundle import INPUT_EXAMPLE, final_settings, log_pyfunc, stage_artifacts
from tagger.calibration import calibrate, calibration_choice, describe_calibration
from tagger.config import DISTILL_TAG_PREFIX, SHIPPED_DATASET, PackageConfig, default_base_model
from tagger.data import load_data
from tagger.records import dataset_name, encoder_name, run_link
from tagger.registry import register_version, version_description
from tagger.runs import ranking_value, run_encoder, select_checkpoint, trained_param
from tagger.signing import SIGNED_TAG, public_key_of, sign_logged_model, signing_line, signing_metadata


def package_best_run(config: PackageConfig) -> ModelVersion:
    """Package the experiment's best run and register it as a new version of config.model_name."""
    key = fingerprint(public_key_of(config.signing_key)) if config.signing_key else None  # a bad key fails first
    calibration_choice(config.temperature, config.calibration_dataset)  # a bad option fails before any download
    experiment = MlflowClient().get_experiment_by_name(config.experiment_name)
    require(f"package {config.experiment_name!r} into {config.model_name!r}",
            registry_needs(config.model_name, experiment.experiment_id if experiment else None))
    with tempfile.TemporaryDirectory() as tmp:
        # config.run_id, else the best run whose checkpoint downloads (runs skipped are printed with the reason)
        run_id, checkpoint_path, checkpoint_dir = select_checkpoint(config, f"{tmp}/download")
        source = mlflow.get_run(run_id)
        metric_value = ranking_value(source.data.metrics, config.metric)  # the best epoch's, when the run logged it
        own_encoder = None if config.base_model else run_encoder(source, f"{tmp}/encoder")  # a student's
        base_model = config.base_model or own_encoder or trained_param(source.data.params, "base_model") or default_base_model()
        encoder = (own_encoder and trained_param(source.data.params, "encoder")) or encoder_name(base_model)
        predictor = config.predictor if config.trace else replace(config.predictor, forward="eager")
        trained_length = trained_param(source.data.params, "max_length")
        if predictor.max_length is None and trained_length:  # serve with the truncation it was trained with
            predictor = replace(predictor, max_length=int(trained_length))
        reference = stage_artifacts(checkpoint_dir, base_model, f"{tmp}/model")
        temperature, calibration = calibrate(config, reference)
        eval_dataset = config.eval_dataset or str(SHIPPED_DATASET)
        rows = load_data(eval_dataset).head(64) if Path(eval_dataset).is_file() else INPUT_EXAMPLE
        calibration_rows = training_rows(source.data.params) if predictor.precision == STATIC_INT8 else None
        artifacts, predictor = make_build(reference, f"{tmp}/build", predictor, rows, calibration_rows)
        accuracy = {} if is_reference(predictor) else accuracy_change(reference, artifacts, predictor, eval_dataset)
        predictor, signature = final_settings(artifacts, predictor)
        # Under `mlflow run`, MLFLOW_RUN_ID names the run and experiment_id is ignored.
        with mlflow.start_run(experiment_id=source.info.experiment_id, run_name="package") as run:
            # Own key names: under `mlflow run` the run already holds the entry point's raw params.
            mlflow.log_params({"source_run_id": run_id, "selection": f"{config.metric} {config.mode}",
                               "encoder": encoder, "calibration.temperature": f"{temperature:.6g}",
                               "calibration.source": calibration["source"]}
                              | {f"predictor.{k}": v for k, v in predictor.to_dict().items()})
        info = log_pyfunc(artifacts, predictor, signature, run.info.run_id, f"{tmp}/manifest",
                          metadata={"source_run_id": run_id, **accuracy, **signing_metadata(key)})
        if config.signing_key:
            sign_logged_model(info.model_id, config.signing_key, tmp)
        mlflow.log_metrics(f1_metrics(accuracy), run_id=run.info.run_id, model_id=info.model_id)  # run and model page
    tags = {
        "source_run_id": run_id,
        config.metric: f"{metric_value:.4f}",
        "checkpoint_path": checkpoint_path or "/",
        "package_run_id": run.info.run_id,
        "engine": predictor.engine,
        "precision": predictor.precision,
        "forward": predictor.forward,
        "training_run": source.info.run_name,
        "encoder": encoder,
        "num_epochs": trained_param(source.data.params, "num_epochs") or "",
        "selected_by": f"{config.metric} {config.mode}",
        "temperature": f"{temperature:.6g}",
        "temperature.source": calibration["source"],
        **accuracy,
        SIGNED_TAG: "true" if key else "false",
        FINGERPRINT_METADATA: key or "",
        **{k: v for k, v in source.data.tags.items() if k.startswith(DISTILL_TAG_PREFIX)},  # a student's teacher
    }
    if "accuracy.dataset" in tags:  # a name, not a local path
        tags["accuracy.dataset"] = dataset_name(eval_dataset)
    description = version_description(tags, [
        f"**Training run**: {run_link(source.info.experiment_id, run_id, source.info.run_name)} (`{run_id}`), "
        f"the best of experiment `{config.experiment_name}` by {config.metric} {config.mode}; "
        f"packaged from its checkpoint at `{checkpoint_path or '/'}`",
        f"**Build**: {build_name(predictor.engine, predictor.precision)} (forward path: {predictor.forward}), "
        f"encoder {encoder}",
        signing_line(key),
        f"**Calibration**: temperature {temperature:.4g} ({describe_calibration(calibration)}), "
        "in `checkpoint/calibration.json`",
    ])
    return register_version(info.model_uri, config.model_name, tags, description, info.model_id)
