"""Our DenseNet against timm's built-in and torchvision's, side by side: images/s, peak memory, ratios, efficiency.

The same as `timm-densenet-ext benchmark`; run from a checkout:

    python benchmarks/benchmark.py --model densenet121 --batch-size 16 --img-size 224 --out benchmarks/results/cpu
"""
import sys

from timm_densenet_ext.benchmark import main

if __name__ == '__main__':
    sys.exit(main())
