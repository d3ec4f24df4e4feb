"""The run's foundations, below every stage: file layout, the run store, the stage contract, declared inputs."""
