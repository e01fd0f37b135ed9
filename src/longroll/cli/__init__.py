"""longroll.cli."""
