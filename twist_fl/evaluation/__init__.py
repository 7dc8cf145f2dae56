"""What a user runs after training: loading models for the verbs, pruning and its baselines,
comparison and reports."""
