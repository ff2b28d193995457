"""Where `fuse_for_inference` spends its time: torch.profiler's per-op table for one batch.

    OMP_NUM_THREADS=2 python benchmarks/profile_fused.py [-m densenet121] [-b 16] [--img-size 224]

BatchNorm statistics come from a few training-mode batches of noise, so that the folded clamps are realistic.
"""
import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import timm_densenet_ext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('-m', '--model', default='densenet121')
    p.add_argument('-b', '--batch-size', type=int, default=16)
    p.add_argument('--img-size', type=int, default=224)
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, args.img_size // 2, args.img_size // 2))
    fused = timm_densenet_ext.fuse_for_inference(model.eval())
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with torch.inference_mode():
        fused(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused(x)
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))


if __name__ == '__main__':
    main()
