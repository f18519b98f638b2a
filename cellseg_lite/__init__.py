"""cellseg-lite: a teaching rebuild of multi-stream cell segmentation with low-level cues.

Lou, Yu et al., "Multi-stream Cell Segmentation with Low-level Cues for
Multi-modality Images", NeurIPS 2022 Cell Segmentation Challenge.

Submodules are imported on demand (``from cellseg_lite import io, metrics``) so
that ``import cellseg_lite`` stays fast and never touches torch or the network.
"""

from cellseg_lite._errors import CellSegError
from cellseg_lite.config import fast_mode

__version__ = "0.1.0"

__all__ = ["CellSegError", "__version__", "fast_mode"]
