"""longroll.ann."""
