"""longroll.kernels."""
