"""The shared data pipeline: rows -> rendered text -> tokens with exact loss masks -> packing.

Both backends call `prepare` with a `DataSpec`, so the same job data gives the same tokens and
masks whichever backend trains. Importing this package is cheap; tokenizers, datasets and
torch are imported by the functions that need them.
"""

from tuneplex.data.spec import DataSpec, DataStats

__all__ = ["DataSpec", "DataStats"]
