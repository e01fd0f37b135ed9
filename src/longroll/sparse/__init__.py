"""longroll.sparse: ANN sparse attention (AnnSA over the KV cache, AnnCA over the prompt)."""

from longroll.sparse.annca import (
    AnnCA,
    AnnCAConfig,
    AnnCAOutput,
    AnnCASelection,
    CollapsedPrompt,
    annca_recall,
    annca_reference,
    collapse_duplicates,
)
from longroll.sparse.annsa import (
    AnnSAConfig,
    AnnSAOutput,
    AnnSAPlan,
    AnnSAPlanner,
    AnnSASelection,
    annsa_reference,
    measure_layer,
)

__all__ = [
    "AnnCA",
    "AnnCAConfig",
    "AnnCAOutput",
    "AnnCASelection",
    "AnnSAConfig",
    "AnnSAOutput",
    "AnnSAPlan",
    "AnnSAPlanner",
    "AnnSASelection",
    "CollapsedPrompt",
    "annca_recall",
    "annca_reference",
    "annsa_reference",
    "collapse_duplicates",
    "measure_layer",
]
