"""longroll: fast, flat-memory long rollouts for autoregressive video diffusion and world models.

Layers (imports point down only): ``kernels`` (Triton) -> ``ops`` (validated launchers + torch reference
twins) -> ``ann`` -> ``cache``, ``sparse`` -> ``planner``, ``policies`` -> ``models``, ``pipeline`` ->
``bench``, ``eval``, ``cli``.
"""

__version__ = "0.1.0"
