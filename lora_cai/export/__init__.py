"""`python -m lora_cai.export`: a run's policy as merged weights, one adapter, GGUF or a dataset, and Hub push."""
