"""The protocol over many runs (``metapl compare``, ``metapl demo``, the benchmarks): ``rows`` (each row's config
from a recipe at equal optimizer steps, ``train_row`` skipping finished and resuming stopped runs, the recommendation)
and ``paired`` (paired differences over seeds and their intervals)."""
