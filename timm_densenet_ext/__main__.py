"""`python -m timm_densenet_ext COMMAND ...`: the command line, as torchrun starts it
(`torchrun --nproc_per_node N -m timm_densenet_ext finetune ...`)."""
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())
