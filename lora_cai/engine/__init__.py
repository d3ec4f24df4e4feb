"""What runs models: loading and stacking, generation, forward passes, API clients, judges, memory planning."""
