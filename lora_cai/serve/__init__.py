"""`python -m lora_cai.serve`: an OpenAI-compatible HTTP server for a run's base and rounds."""
