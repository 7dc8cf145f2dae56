"""Entry points only: the `twist-fl` CLI, the Hydra sweep and its summary, benchmarks."""
