"""The round loop above the stages: the models in memory, the stage order, what a run prints."""
