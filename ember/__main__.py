"""`python -m ember COMMAND ...` is the `ember` command (also under `torchrun ... -m ember train ...`)."""

import sys

from ember.cli import main

sys.exit(main())
