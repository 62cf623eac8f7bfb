"""`python -m devserver`: the command line."""

from .cli import main

raise SystemExit(main())
