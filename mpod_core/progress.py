"""The one progress callback type of the core's long loops."""
from __future__ import annotations

from typing import Callable, Optional

import torch

#: ``progress(step, total, preview)``, called by long loops after each unit of work: ``step`` of
#: ``total`` done, ``preview`` an (H, W, 3) image in [0, 1] or None. It may raise to stop the loop
#: (ComfyUI's Cancel); loops leave no half-written state behind when it does.
ProgressFn = Callable[[int, int, Optional[torch.Tensor]], None]
