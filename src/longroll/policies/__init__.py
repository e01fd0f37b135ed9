"""longroll.policies."""
