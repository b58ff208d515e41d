"""``python -m clusterssl …``: the same command line as the ``clusterssl`` script."""

from __future__ import annotations

from clusterssl.tools.cli import main

if __name__ == "__main__":
    main()
