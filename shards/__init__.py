"""The shard format: sample keys and components, writing from sources, DALI index files, manifest, verify.

Imports nothing from ``pipeline`` or ``tools``: everything downstream trusts what this package wrote.
"""
