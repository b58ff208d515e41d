"""What MLflow's UI shows in its own columns: the experiment's kind, dataset inputs and logged models.

The ``mlflow.experimentKind`` tag is MLflow 3's record of what an experiment holds; ours hold trained
models. MLflow 3.17's UI does not read it to choose its view: the view follows the UI's workflow setting
(GenAI by default; ``?workflowType=machine_learning`` in the address, or the sidebar's "Model training"
switch, remembered per browser), so the addresses clusterssl prints go to ``#/experiments/<id>/runs``,
the runs table. Its Dataset column lists a run's dataset inputs, its Models column the models logged
from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from clusterssl.shards.manifest import Manifest

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""The kind MLflow gives experiments of trained models (as opposed to GenAI apps)."""
SOURCE_TYPE = "clusterssl-shards"


def mark_model_training(client: Any, experiment_id: str) -> None:
    """Tag the experiment as one of trained models; a kind set by the user is kept."""
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def shard_set_input(manifest: Manifest, name: str, context: str) -> Any:
    """A shard set as an MLflow dataset input: its manifest's hash as the digest, its folder as the
    source, its counts as the profile; ``context`` (``training``, ``evaluation``…) tags its use."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from clusterssl.shards.format import COMPONENT_ORDER, stored_ext

    components = [stored_ext(ext, manifest.format_version) for ext in COMPONENT_ORDER]
    profile = {
        "num_samples": manifest.count,
        "num_classes": len(manifest.classes),
        "num_shards": len(manifest.shards),
        "bytes": sum(s.bytes for s in manifest.shards),
        "skipped": len(manifest.skipped),
    }
    dataset = Dataset(
        name=name,
        digest=manifest.content_hash(),
        source_type=SOURCE_TYPE,
        source=json.dumps({"uri": str(Path(manifest.root).resolve()) if manifest.root else name}),
        schema=json.dumps({"components": components, "classes": manifest.classes[:100]}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_pytorch_model(client: Any, run_id: str, tracking_uri: str, module: torch.nn.Module, name: str) -> str:
    """Log ``module`` with MLflow's PyTorch flavour as a model of the run (``runs:/<run id>/<name>``);
    returns its MLflow model id.

    The logged model is created in the run's experiment first (MLflow would otherwise file it under the
    globally active one), and the flavour's fluent call runs with this store's URI, restored after.
    """
    import mlflow.pytorch
    import torch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    with _use_tracking_uri(tracking_uri):
        mlflow.pytorch.log_model(
            module,
            name=name,
            run_id=run_id,
            model_id=logged.model_id,
            # a pickled module: it embeds any batch size, which a traced (pt2) graph would fix at logging
            serialization_format="pickle",
            # listed, not inferred: inferring them loads the model again in a subprocess
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "clusterssl"],
        )
    return str(logged.model_id)
