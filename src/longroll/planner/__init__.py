"""longroll.planner."""
