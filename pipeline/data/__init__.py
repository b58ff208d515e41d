"""Stream and augment: shard sets, the epoch plan, the multi-crop spec, augmentation, the pre-decode
integrity checks, the DALI and torch backends, and the loader that yields ``Batch`` values."""
