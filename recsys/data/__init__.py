"""Data: readers, preprocessing, synthetic domains, candidates, text and the shared DataModule."""

from recsys.data.domain import Domain, Example, DataError

__all__ = ["Domain", "Example", "DataError"]
