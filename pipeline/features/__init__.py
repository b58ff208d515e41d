"""Features: the index-stable extraction pass, the on-disk feature store (row i = sample i), clustering
reports, and evaluation (k-NN, NMI)."""
