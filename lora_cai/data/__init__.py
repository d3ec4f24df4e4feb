"""What a run reads: prompt sources, held-out sets, and the recipe's data loaded and validated once."""
