"""Speed and memory of our DenseNet side by side with timm's built-in and torchvision's, in one run.

Every implementation gets the same weights and the same input. The candidates run interleaved (one timed call each
per round, several rounds) and the median counts, so a machine that slows down mid-run slows all of them alike.
Ratios are against timm's built-in eager model on ordinary NCHW input. Peak memory is, on the CPU, the growth of
resident memory during one call, measured in a separate process per candidate (the kernel's high-water mark, reset
before the call, with glibc returning freed buffers at once), and `torch.cuda.max_memory_allocated` on a GPU.
Efficiency is the model's nominal FLOPs per second over this machine's measured speed on a large 3x3 convolution.
`--precision` adds our deployment path, `optimize_for_inference`, at each precision asked for (fp32 by default), its
first-output time including the compile or the quantization.

    timm-densenet-ext benchmark --model densenet121 --batch-size 16 --img-size 224 --output bench/

The parts: `candidates` (the table of implementations measured), `measure` (timing, `run_benchmark`), `memory` (the
peak-memory probe), `table` and `chart` (the report), `command` (the command line).
"""
from .candidates import CANDIDATES, Candidate
from .chart import write_chart
from .command import add_arguments, main, run_from_args
from .measure import conv_peak_gflops, run_benchmark
from .memory import peak_memory
from .table import format_table

__all__ = ['run_benchmark', 'format_table', 'write_chart', 'conv_peak_gflops', 'peak_memory', 'main',
           'add_arguments', 'run_from_args', 'Candidate', 'CANDIDATES']
