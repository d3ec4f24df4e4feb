"""The recipe schema and how recipe files are found, loaded and overridden."""
