"""Training on Ray Train (build time only; the served model never imports it)."""
