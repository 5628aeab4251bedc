"""`python -m parti_from_scratch ...` is the same as the `parti-from-scratch` command."""
import sys

from parti_from_scratch.cli import main

sys.exit(main())
