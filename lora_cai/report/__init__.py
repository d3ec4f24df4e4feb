"""`python -m lora_cai.report RUN_DIR`: tables and plots across a run's rounds, as Markdown and HTML."""
