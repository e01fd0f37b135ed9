"""longroll.models."""
