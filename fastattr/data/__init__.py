"""Whole datasets as the unit of work: [`attribute_dataset`][fastattr.attribute_dataset] runs
an attribution method over every example of a dataset, on one process or on every rank of a
torch.distributed job, into a resumable zarr store that [`open_store`][fastattr.open_store]
reads lazily. Needs zarr 3
(``pip install 'fastattr[data]'``)."""

from fastattr.data._batches import labeled
from fastattr.data._distributed import JobFailed
from fastattr.data._pipeline import StoreWriteError, attribute_dataset
from fastattr.data._store import AttributionStore, Rows, open_store

__all__ = [
    "AttributionStore",
    "JobFailed",
    "Rows",
    "StoreWriteError",
    "attribute_dataset",
    "labeled",
    "open_store",
]
