"""ditfast: a fast, drop-in Diffusion Transformer (DiT) package for PyTorch.

``from ditfast import DiT, DiT_models, create_diffusion`` replaces the official DiT repository's
``models`` and ``diffusion`` imports; ``from ditfast import DiffiT, Diffit`` the latent DiffiT
release's ``diffit.diffit`` (DiffiT, Hatamizadeh et al., ECCV 2024); ``DiffiTUNet`` is the paper's
image-space model (windowed TMSA in a U-shaped network), trained and sampled with EDM (``ditfast.edm``).
"""

__version__ = "0.1.0"

from .models import DiT, DiT_models  # noqa: E402
from .models import *  # noqa: E402,F401,F403  (DiT_XL_2, ... as in the official models.py)
from .diffit import DiffiT, Diffit, DiffiT_models  # noqa: E402
from .diffit_unet import DiffiTUNet, DiffiTUNet_models  # noqa: E402
from .diffusion import create_diffusion  # noqa: E402
from .checkpoint import load_model, load_state_dict  # noqa: E402
from .flops import gflops  # noqa: E402
from .sampling import sample  # noqa: E402
from .interop import diffusers_transformer, save_diffusers  # noqa: E402
from . import ops  # noqa: E402

__all__ = ["DiT", "DiT_models", "DiffiT", "Diffit", "DiffiT_models", "DiffiTUNet", "DiffiTUNet_models", "create_diffusion", "load_model", "load_state_dict", "gflops", "sample", "save_diffusers", "diffusers_transformer", "ops", "__version__"]
