"""longroll.ops."""
