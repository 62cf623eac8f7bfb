"""`python -m devserver`: the command line."""

from devserver.cli.main import main

raise SystemExit(main())
