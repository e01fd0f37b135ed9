"""longroll.pipeline."""
