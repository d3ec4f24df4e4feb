"""The package version: one place, read by the manifest, exports and `lora_cai.__version__`."""

__version__ = "0.1.0"
