"""`python -m waveclip ...`: the entry point of the command line (which lives in `waveclip_cli`).

This module runs only as a script; nothing imports it, so the inference package stays below the
command line in the import order.
"""

import sys

from waveclip_cli.main import main

sys.exit(main())
