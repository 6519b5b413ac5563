"""Interoperability with other DiT implementations: :mod:`ditfast.interop.diffusers` (diffusers'
``DiTTransformer2DModel`` folders and ``DiTPipeline``)."""

from .diffusers import diffusers_transformer, is_diffusers_folder, load_diffusers, save_diffusers

__all__ = ["diffusers_transformer", "is_diffusers_folder", "load_diffusers", "save_diffusers"]
