"""Buffers whose shape is only known at run time (queues sized by the global batch, per-sample tables
sized by the training set), and how a checkpoint restores them."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn


class RuntimeShapedBuffers(nn.Module):
    """Mixin for modules with buffers allocated at run time (e.g. ``(N,)`` pseudo-labels, a queue).

    List their names in ``runtime_buffers``. Such a buffer starts with a placeholder shape; when a
    checkpoint is loaded, each one takes the checkpoint's shape first, so that ``load_state_dict`` fills it
    instead of failing on a size mismatch (a mid-epoch resume needs those tables back without
    re-clustering).
    """

    runtime_buffers: ClassVar[tuple[str, ...]] = ()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self.runtime_buffers:
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(saved, Tensor) and saved.shape != current.shape:
                setattr(self, name, current.new_zeros(saved.shape))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
