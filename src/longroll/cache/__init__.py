"""longroll.cache."""
