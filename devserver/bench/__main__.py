"""`python -m devserver.bench`."""

import sys

from devserver.bench.run import main

sys.exit(main())
