"""`torchrun --nproc-per-node N -m ember.train [ember train arguments]`: one rank of a run."""

import sys

from ember.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
