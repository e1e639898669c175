#!/usr/bin/env python
"""Train any registered component from a config (the same as ``vargen-train``).

python train.py --config configs/digits_vq.yaml [key=value ...]
torchrun --nproc_per_node 2 train.py --config configs/digits_ar.yaml
"""

import sys

from vargen.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
