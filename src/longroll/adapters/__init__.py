"""longroll's caches and policies for code that is not longroll's own model: a tensor-level API
(:mod:`longroll.adapters.functional`), a Self-Forcing-style cache interface (:mod:`longroll.adapters.self_forcing`)
and diffusers' ``WanTransformer3DModel`` (:mod:`longroll.adapters.diffusers`, needs diffusers)."""
