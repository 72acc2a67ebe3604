"""gradscope: per-pair gradient diagnostics for Bradley-Terry reward models."""

__version__ = "0.1.0"
