"""The retrieval service's exceptions that reach the LM side's commands, re-exported for their one-line errors.

- `RetrieverError`: a call to the service failed;
- `DatastoreError`: a datastore folder is missing or damaged (e.g. a `--datastore` given);
- `BuildError`: a datastore build cannot run with its inputs (an existing output, bad `--shards` or
  `--factory`), or failed;
- `SecurityError`: a TLS or token file is missing (a ValueError);

and `shown`, an error's message as a terminal may show it (a server's words can carry escapes); `safe_text`
and `one_line` (from the service's `untrusted`), for the LM side's own untrusted text: values read from files,
a model's output.

Example:
    >>> try:
    ...     run(args)
    ... except SERVICE_ERRORS as err:
    ...     print(f"error: {err}", file=sys.stderr)
"""

from __future__ import annotations

from retriever_server.client import RetrieverError
from retriever_server.datastore.build_inputs import BuildError
from retriever_server.datastore.manifest import DatastoreError
from retriever_server.security.config import SecurityError
from retriever_server.wire.untrusted import SHOWN_ERROR, one_line, safe_text

__all__ = ["RetrieverError", "DatastoreError", "BuildError", "SecurityError", "SERVICE_ERRORS", "shown", "one_line",
           "safe_text"]

SERVICE_ERRORS: tuple[type[Exception], ...] = (RetrieverError, DatastoreError, BuildError, SecurityError)


def shown(err: BaseException) -> str:
    """`err`'s message with its control characters but newlines escaped, cut at SHOWN_ERROR characters."""
    return one_line(str(err), SHOWN_ERROR, newlines=True)
