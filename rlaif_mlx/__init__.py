"""rlaif-mlx: RL from AI feedback for code-generation models, on MLX and PyTorch.

Importing the package is cheap and needs neither mlx nor torch; a backend's
framework is imported only when that backend is chosen.
"""

__version__ = "0.1.0"
