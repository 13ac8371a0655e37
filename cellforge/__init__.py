"""cellforge: agentic design of virtual-cell models for single-cell perturbation data."""

__version__ = "0.1.0"
