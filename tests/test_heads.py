"""The methods' projection head: two layers with a hidden width, one linear layer when it is 0."""

from __future__ import annotations

from torch import nn

from clusterssl.models.heads import projection_head


def _layers(head: nn.Module) -> list[type[nn.Module]]:
    return [type(layer) for layer in head.mlp]


def test_projection_head_with_a_hidden_width_has_two_linear_layers() -> None:
    head = projection_head(16, 32, 8)
    assert _layers(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head.mlp[0].in_features, head.mlp[0].out_features, head.mlp[3].out_features) == (16, 32, 8)
    assert _layers(projection_head(16, 32, 8, batch_norm=False)) == [nn.Linear, nn.ReLU, nn.Linear]


def test_projection_head_without_a_hidden_width_is_one_linear_layer() -> None:
    head = projection_head(16, 0, 8)
    assert _layers(head) == [nn.Linear]
    assert (head.mlp[0].in_features, head.mlp[0].out_features) == (16, 8)
