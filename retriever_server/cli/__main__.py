"""`python -m retriever_server.cli`: the same as the `retriever-server` command."""

import sys

from retriever_server.cli import main

sys.exit(main())
