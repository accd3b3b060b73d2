"""Runtime code of the tagger MLflow model: everything the served model imports (no Ray)."""
