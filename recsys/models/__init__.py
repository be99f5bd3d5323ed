"""Models: backbones, scoring head, X-Cross integrators, adapter store and merging."""
