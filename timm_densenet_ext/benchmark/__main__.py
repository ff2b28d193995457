"""`python -m timm_densenet_ext.benchmark`: the benchmark without the CLI (and the memory probe's process)."""
import sys

from .command import main

if __name__ == '__main__':
    sys.exit(main())
