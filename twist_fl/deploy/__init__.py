"""Real Flower processes: certificates and keys, process ownership, a local SuperLink/SuperNode
deployment."""
