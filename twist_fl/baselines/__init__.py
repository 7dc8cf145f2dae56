"""Baselines that are not Flower strategies: data-parallel training on torch.distributed."""
