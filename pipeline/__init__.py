"""Everything that moves data at run time: readers, multi-crop spec, DALI and torch backends, loader,
extraction pass, trainer, tracking."""
