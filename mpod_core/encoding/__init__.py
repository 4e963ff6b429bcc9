"""Input encodings for neural fields: the multiresolution hash grid (Instant-NGP).

``HashGridEncoding(HashGridConfig(), backend="auto" | "torch" | "tcnn")`` maps
``(N, 3)`` points in ``[0, 1]^3`` to ``(N, n_levels * n_features_per_level)``
features. The torch backend runs anywhere; tinycudann is imported only when the
``tcnn`` backend is requested (or ``auto`` finds CUDA).
"""
from .hashgrid import (HASH_PRIMES, HashGridConfig, HashGridEncoding, LevelLayout, hash_grid_encode,
                       level_layout, spatial_hash)

__all__ = ["HASH_PRIMES", "HashGridConfig", "HashGridEncoding", "LevelLayout", "hash_grid_encode",
           "level_layout", "spatial_hash"]
