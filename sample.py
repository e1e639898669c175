#!/usr/bin/env python
"""Draw images from a trained generator checkpoint (the same as ``vargen-sample``).

python sample.py --ckpt runs/digits_ar [key=value ...]
torchrun --nproc_per_node 2 sample.py --ckpt runs/digits_ar num_samples=1000 fid=true
"""

import sys

from vargen.cli import sample_main as main

if __name__ == "__main__":
    sys.exit(main())
