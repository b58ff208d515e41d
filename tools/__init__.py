"""The click CLI (``clusterssl``) and the benchmarks."""
