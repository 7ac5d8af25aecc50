"""Stage 2 of CellDetector: tiled, parallel Cellpose nuclei segmentation of whole slides.

Modules, each named for what it does:

- :mod:`.synthetic` renders nuclei-like images with ground-truth labels (training, tests).
- :mod:`.bootstrap` trains the small fallback Cellpose model (``omeflow bootstrap-model``).
- :mod:`.model` resolves which weights to use and loads them once per process.
- :mod:`.tiling` lays shard-aligned tiles with a halo and decides which tile owns a nucleus.
- :mod:`.tissue` finds the tiles whose window meets no tissue ROI (not segmented).
- :mod:`.normalise` computes the one DAPI normalisation range every tile of an image uses.
- :mod:`.tile_result` is the per-tile result file (``segmentation/tiles/<ty>_<tx>.npz``).
- :mod:`.run_tiles` runs the tiles of one array task on a process pool.
- :mod:`.stats` computes the per-nucleus window statistics (mean/median/var/skew).
- :mod:`.merge` reconciles tile seams, assigns global ids, writes labels and the table,
  streaming (bounded memory).
- :mod:`.labels` writes the OME-NGFF 0.5 ``labels/nuclei`` group (a multiscale pyramid).

Heavy libraries (torch, cellpose) are imported only where they are needed.
"""
