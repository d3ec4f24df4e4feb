"""Constitutional AI's own content, without models: constitutions, label rules, the refusal detector, metrics."""
