"""`python -m waveclip_cli ...` runs the `waveclip` command line."""

import sys

from .main import main

sys.exit(main())
