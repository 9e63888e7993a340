"""``python -m qcore``: the ``qcore`` command (so ``torchrun -m qcore quantize ...`` runs it)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from qcore.app.cli import main

    sys.exit(main())
