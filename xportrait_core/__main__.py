"""`python -m xportrait_core ...`: see xportrait_core/cli.py."""
from .cli import main

raise SystemExit(main())
