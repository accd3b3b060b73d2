"""tagger's build side: train on Ray Train, package the best MLflow run, register, promote, evaluate.

The served model's own code is the separate package `mlflow_model`, which ships inside the model.
"""
