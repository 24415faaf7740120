"""``python -m messages_async``: the same as the ``messages-async`` command."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from ._cli import main

    sys.exit(main())
