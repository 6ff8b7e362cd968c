"""``python -m rlaif_mlx.cli``: the same as the ``rlaif-mlx`` script (torchrun and mlx.launch start it so)."""

import sys

from . import main

sys.exit(main())
