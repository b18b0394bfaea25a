"""Values the pretraining options take, kept free of torch and scipy so that the command line can list them in
``--help`` at once."""

from __future__ import annotations

VARIANTS = ("naive", "aug", "equiv")
POINT_MODES = ("uniform", "body", "balanced")
FOREGROUND_HU = -500.0  # voxels above it are the body (the cache's crop, the "body" points, localize's search)
