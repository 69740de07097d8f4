"""`python -m sidecar ...` is `rerank-sidecar ...`."""

import sys

from sidecar.cli import main

sys.exit(main())
