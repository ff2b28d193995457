"""Numerical parity with the DenseNets we did not write: timm's built-in and torchvision's.

`python -m timm_densenet_ext.parity` prints the max abs difference of every variant against each reference.
"""
import argparse
from typing import Callable, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

__all__ = ['reference_builders', 'randomize_', 'compare', 'main']


def reference_builders(name: str) -> Dict[str, Callable[[], nn.Module]]:
    """Constructors of the independent implementations of variant `name` ('timm', 'torchvision'), if any."""
    import torchvision
    import timm.models.densenet as timm_densenet
    refs = {}
    arch = name[3:] if name.startswith('tv_') else name
    if hasattr(timm_densenet, arch):  # timm's own entrypoint function, bypassing the registry
        refs['timm'] = getattr(timm_densenet, arch)
    elif arch == 'densenet121d':  # timm has no such variant, but its DenseNet class builds the same network
        refs['timm'] = lambda: timm_densenet.DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), stem_type='deep')
    if arch in torchvision.models.list_models(module=torchvision.models):  # its classification models
        refs['torchvision'] = torchvision.models.get_model_builder(arch)
    return refs


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a random value (so outputs exercise every weight), and BN a batch count."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.fill_(7)  # any count a fresh layer does not have
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2. / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model


@torch.no_grad()
def compare(name: str, img_sizes: Sequence[int] = (64, 224), batch_size: int = 2, seed: int = 0,
            refs: Optional[Dict[str, Callable[[], nn.Module]]] = None) -> Dict[Tuple[str, int], dict]:
    """Load one set of random weights into ours and each reference; return, per (reference, image size), the max
    abs output difference, the output scale (max abs output) and whether the state-dict keys are identical."""
    ours = randomize_(timm.create_model(name), seed).eval()
    state = ours.state_dict()
    gen = torch.Generator().manual_seed(seed)
    inputs = {size: torch.randn(batch_size, 3, size, size, generator=gen) for size in img_sizes}
    outputs = {size: ours(x) for size, x in inputs.items()}
    results = {}
    for ref_name, build in (refs or reference_builders(name)).items():
        ref = build().eval()
        ref_keys = set(ref.state_dict())
        ref.load_state_dict(state)
        for size, x in inputs.items():
            ref_out = ref(x)
            results[ref_name, size] = dict(
                max_abs_diff=(outputs[size] - ref_out).abs().max().item(),
                scale=ref_out.abs().max().item(),
                same_keys=ref_keys == set(state),
            )
        del ref
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    import timm_densenet_ext
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 224])
    parser.add_argument('--models', nargs='+', default=list(timm_densenet_ext.MODEL_NAMES))
    args = parser.parse_args(argv)
    print(f'{"model":<20}{"size":>5}  {"reference":<12}{"max abs diff":>14}{"output scale":>14}  same keys')
    for name in args.models:
        if not reference_builders(name):
            print(f'{name:<20}{"":>5}  (no independent implementation exists)')
            continue
        for (ref, size), r in sorted(compare(name, args.sizes).items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f'{name:<20}{size:>5}  {ref:<12}{r["max_abs_diff"]:>14.3e}{r["scale"]:>14.3f}  {r["same_keys"]}')


if __name__ == '__main__':
    main()
