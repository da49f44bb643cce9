"""search: the search space's grammar (space) and its conditions and exclusions (constraints), the
sampler and pruner registry (samplers), the study with its budgets and grid queue (study), and where
it is stored (storage)."""
