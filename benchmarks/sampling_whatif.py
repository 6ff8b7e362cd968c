"""Where the profile compares "now" with "the proposed fix".

The fixes once prototyped here (inverse-CDF draw for PyTorch; one-pass draw and
last-position LM head for MLX) are now the backends' own code, so ``proposed``
changes nothing: both timings measure the current code, and their gap shows
the timing noise.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def proposed(backend):
    """No patch: the proposed fixes have landed in ``rlaif_mlx/backends``."""
    yield
