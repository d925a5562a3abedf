"""`python -m lm_worker.cli`: the same as the `lm-worker` command."""

import sys

from lm_worker.cli import main

sys.exit(main())
