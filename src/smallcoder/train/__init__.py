"""Training: recipes, the trainer, and data-parallel scale-out."""
