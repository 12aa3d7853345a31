"""``python -m lavis_xformer COMMAND ...``: the ``lavis-xformer`` command line (``lavis_xformer/cli.py``)."""

import sys

from lavis_xformer.cli import main

sys.exit(main())
