"""Fisher information for EWC: per-sample rows, diagonal, exact full and K-FAC forms (estimators), and the
layer-wise block Fisher of Hiratani 2024 (layerwise)."""
