"""longroll.sparse."""
