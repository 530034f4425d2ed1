"""`nanollm sweep`: every (file, budget, size, seed) run sized, trained by the trainer, evaluated, tabulated and plotted."""
