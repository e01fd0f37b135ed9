"""longroll.eval."""
