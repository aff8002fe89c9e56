"""Image-level segmenters: one module each (see ``ssl_bench/stages/__init__.py`` for the interface).

- ``louvain``: DatUS^2's Louvain communities of the key graph, split into connected segments;
- ``dsm``: Deep Spectral Methods' eigen-segments of the feature (and colour) affinity Laplacian;
- ``proposals``: PriMaPs' principal mask proposals, each proposal a segment;
- ``image_kmeans``: per-image k-means of the patch features (the baseline segmenters are compared with);
- ``acseg``: ACSeg's adaptive concept generator, learned (trained by the modularity loss on a split's features).
"""
