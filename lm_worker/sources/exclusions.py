"""The datastore rows of a query's own document, which retrieval leaves out.

`knn_exclusions` and `chunk_exclusions` give, per query, the one row range [start, end) of a kNN-LM
or RETRO source (built from this same store) that holds any token of the query's own document(s).
Training-time neighbour precompute and evaluation on the datastore's own text exclude them alike.
"""

from __future__ import annotations

import numpy as np

from lm_worker.data.token_store import TokenStore


def knn_exclusions(store: TokenStore, positions: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Per stream position, the kNN-LM rows [start, end) of its own document.

    Row j holds tokens[j] and its value tokens[j + 1], so document [ds, de) owns rows [ds - 1, de)
    (row ds - 1 has the document's first token as its value), clipped to the N - 1 rows.
    """
    positions = np.arange(len(store) - 1) if positions is None else np.asarray(positions)
    starts, ends = document_bounds(store)
    docs = np.asarray(store.doc_ids[positions])
    lo = np.maximum(starts[docs] - 1, 0)
    hi = np.minimum(ends[docs], len(store) - 1)
    return list(zip(lo.tolist(), hi.tolist()))


def document_bounds(store: TokenStore) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([d.start for d in store.documents], dtype=np.int64),
            np.array([d.end for d in store.documents], dtype=np.int64))


def chunk_exclusions(store: TokenStore, chunk_len: int, window: int) -> list[tuple[int, int]]:
    """Per chunk c of the store, the RETRO rows [start, end) that hold any token of the document(s) of c
    and of every token that a window holding c predicts.

    Chunk c's neighbours are attended to from position cL + L - 1 on, and through the self-attention of
    the layers after it they reach every later position of the window: a window of `window` positions
    that holds chunk c starts at or before cL, so it predicts tokens up to cL + window. The documents
    excluded therefore run from that of c's first token to that of token cL + max(window, 2L - 1):
    otherwise chunk c could retrieve the very text the same window is scored on further on (a later
    document's, or the next document's first chunk). Give the training window (`seq_len`) for training
    neighbours and `context_len` for evaluation. Row r's payload is tokens[r*L : r*L + 2L], so a
    document [ds, de) reaches rows ds // L - 1 (whose continuation holds the document's first tokens) to
    ceil(de / L) - 1; documents are adjacent, so the union is one range. Rows are those of a RETRO source
    made from this same store with this chunk_len.
    """
    L, C, N = chunk_len, len(store) // chunk_len, len(store)
    starts, ends = document_bounds(store)
    first_doc = np.asarray(store.doc_ids[0:C * L:L])  # (C,) the document of each chunk's first token
    reach = max(window, 2 * L - 1)  # tokens after a chunk's first that its neighbours help predict
    last_target = np.minimum(np.arange(C) * L + reach, N - 1)  # (C,) the last token they help predict
    last_doc = np.asarray(store.doc_ids[last_target])  # (C,) ... and its document
    lo = np.maximum(starts[first_doc] // L - 1, 0)
    hi = np.minimum(-(-ends[last_doc] // L), C)
    return list(zip(lo.tolist(), hi.tolist()))
