"""`python -m quantpipe` entry point."""

from quantpipe.cli import main

raise SystemExit(main())
