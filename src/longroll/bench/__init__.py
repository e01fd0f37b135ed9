"""longroll.bench."""
