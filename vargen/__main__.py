"""``python -m vargen {train,sample,plot} ...``: the ``vargen`` console command."""

import sys

from vargen.cli import main

sys.exit(main())
