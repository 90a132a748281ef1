"""mae-deploy runtime: torch-free bundle loading, preprocessing, runners and pipelines.

Importing this package never imports torch (tested): production images install it without PyTorch.
"""

__version__ = "0.1.0"
