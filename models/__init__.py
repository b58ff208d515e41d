"""Backbones, heads, Sinkhorn, faiss clustering, and one module per method (swav, dino, deepcluster, pcl).

Imports nothing from ``pipeline``, ``tools`` or ``shards``: what a method needs from the run reaches it
through the context object the trainer hands to its hooks (see ``models.method.TrainContext``).
"""
