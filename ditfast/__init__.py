"""ditfast: a fast, drop-in Diffusion Transformer (DiT) package for PyTorch.

``from ditfast import DiT, DiT_models, create_diffusion`` replaces the official DiT repository's
``models`` and ``diffusion`` imports.
"""

__version__ = "0.1.0"

from .models import DiT, DiT_models  # noqa: E402
from .models import *  # noqa: E402,F401,F403  (DiT_XL_2, ... as in the official models.py)
from .diffusion import create_diffusion  # noqa: E402
from .checkpoint import load_model, load_state_dict  # noqa: E402
from .flops import gflops  # noqa: E402
from .sampling import sample  # noqa: E402
from . import ops  # noqa: E402

__all__ = ["DiT", "DiT_models", "create_diffusion", "load_model", "load_state_dict", "gflops", "sample", "ops", "__version__"]
