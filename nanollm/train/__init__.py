"""The training runtime: recipes, data, checkpoints, parallelism and the loop behind `nanollm train` / `nanollm eval`."""
