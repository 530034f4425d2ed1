"""`python -m nanollm` (and `accelerate launch -m nanollm`): the command line."""
from .cli import main

raise SystemExit(main())
