"""Run time, by stage: ``data`` (stream and augment), ``train`` (the trainer), ``features`` (extraction, the
feature store, clustering reports, evaluation) and ``tracking`` (MLflow, plots); ``runner`` stages them."""
