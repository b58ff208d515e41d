"""Tracking: MLflow runs (one per stage, nested under the pipeline run) and the plots logged with them."""
