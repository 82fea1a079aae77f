"""``python -m server.sandbox`` (see server.sandbox.cli)."""

import sys

from server.sandbox.cli import main

sys.exit(main())
