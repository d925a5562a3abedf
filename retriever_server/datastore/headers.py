"""What a shard's files must say about themselves, checked at every load, with or without the full
sha256 verification: the FAISS index's dimension, metric, rows and inverted-list sizes, and the shape
and dtype in each .npy header. A file whose header disagrees with the manifest is refused, naming the
file and the field, before any search runs on it.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore import index as ix
from retriever_server.datastore.manifest import DatastoreError, Manifest, ShardEntry
from retriever_server.datastore.row_parts import NPY_ERRORS, escaped


def read_checked_index(path: Path, manifest: Manifest, entry: ShardEntry, mmap: bool) -> faiss.Index:
    """Reads `path` and checks it against the manifest; raises DatastoreError naming what differs."""
    try:
        index = ix.read_index(path, mmap=mmap)
    except RuntimeError as err:
        raise DatastoreError(f"{escaped(path)} is not a readable FAISS index: {ix.faiss_reason(err)}") from None
    check_index(path, index, manifest, entry)
    return index


def check_index(path: Path, index: faiss.Index, manifest: Manifest, entry: ShardEntry) -> None:
    """The index's d, metric, ntotal and nlist are the manifest's, and its lists hold ntotal rows."""
    found = {"d": index.d, "metric": index.metric_type, "ntotal": index.ntotal, "nlist": ix.nlist_of(index)}
    wanted = {"d": manifest.dimension, "metric": ix.METRICS[manifest.metric], "ntotal": entry.ntotal,
              "nlist": manifest.nlist}
    for name, value in wanted.items():
        if found[name] != value:
            raise DatastoreError(f"{path} header has {name} {found[name]}; the manifest says {value}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        if (sizes < 0).any() or int(sizes.sum()) != entry.ntotal:
            raise DatastoreError(f"{path} inverted lists hold {int(sizes.sum())} rows; the manifest says "
                                 f"{entry.ntotal}")


def load_checked_array(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Maps a .npy file read-only after checking its header's dtype and shape."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except NPY_ERRORS as err:
        raise DatastoreError(f"{path} is not a readable .npy array: {escaped(err, 200)}") from None
    if not isinstance(array, np.ndarray):  # np.load opens a .npz archive too, whatever the file's name
        array.close()
        raise DatastoreError(f"{path} is a .npz archive, not a .npy array: a shard's arrays are saved with np.save")
    if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise DatastoreError(f"{path} header says {array.dtype} {tuple(array.shape)}; the manifest says "
                             f"{np.dtype(dtype)} {tuple(shape)}")
    return array
