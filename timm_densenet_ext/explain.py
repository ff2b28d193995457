"""Class activation maps: where in an image a DenseNet found the evidence for a class.

The maps are pytorch-grad-cam's (package `grad-cam`, the `explain` extra): Grad-CAM by default, or another of its
methods. What is ours: the layer they weigh (`target_layer`: the final feature map, before the pool, of every form a
DenseNet takes here), the model's own preprocessing (`model_io.preprocessing`, `images.read_image`), and the overlay
of the map on the image the model saw, written as PNG through `_files`.

Gradients are taken at that layer only: everything before it runs without autograd, so the map costs about one
forward pass, and the model is left as it was found (its mode, `requires_grad` flags and `.grad`).
"""
import contextlib
import sys
import types
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ._naming import arg

__all__ = ['METHODS', 'target_layer', 'explain']

# our names for pytorch-grad-cam's methods (its class names); eigencam needs no class and no gradients
METHODS = {
    'gradcam': 'GradCAM', 'gradcam++': 'GradCAMPlusPlus', 'hirescam': 'HiResCAM', 'xgradcam': 'XGradCAM',
    'layercam': 'LayerCAM', 'eigencam': 'EigenCAM',
}
_INSTALL_HINT = "pip install 'timm-densenet-ext[explain]' (pytorch-grad-cam, package grad-cam)"
_FEATURE_WRAPPERS = ('FeatureListNet', 'FeatureDictNet', 'FeatureHookNet', 'FeatureGetterNet', 'FeatureGraphNet')

ImageInput = Union[str, Path, 'Image.Image', torch.Tensor]  # a file, a PIL image, or a preprocessed tensor


def target_layer(model: nn.Module) -> nn.Module:
    """The module whose output a class activation map weighs: the final feature map before the pool.

    A DenseNet (any stem, `output_stride` 8/16/32): `features.norm5`, the final BN-ReLU. Pruned by
    `prune_intermediate_layers`: the last module kept (a dense block, or the kept transition's norm). `features_only`
    (every `feature_cls`): the module of the deepest tap it returns. The fused inference model
    (`fuse_for_inference`), whose final norm is folded into its forward: its last dense block, whose maps are close
    to the unfused model's but not the same. Anything else: ValueError.
    """
    from .models.densenet import DenseNet, DenseTransition
    from .models.fused import FusedDenseNet
    if isinstance(model, DenseNet):
        last = model.features[-1]
        return last.norm if isinstance(last, DenseTransition) else last
    if isinstance(model, FusedDenseNet):
        return model.stages[-1]
    if type(model).__name__ in _FEATURE_WRAPPERS:
        return _feature_tap(model)
    raise ValueError(
        f'{type(model).__name__}: no layer for a class activation map is known; give a timm_densenet_ext DenseNet '
        f'(whole, pruned, features_only or fused).')


def _feature_tap(model: nn.Module) -> nn.Module:
    """The module of the deepest tap a timm feature wrapper returns, wherever the wrapper keeps it."""
    info = model.feature_info
    name = info.info[max(info.out_indices)]['module']
    first, _, rest = name.partition('.')
    flat = f'{first}_{rest}'  # flatten_sequential: 'features.norm5' -> 'features_norm5'
    owners = [m for m in (getattr(model, 'model', None), getattr(model, 'graph_module', None)) if m is not None]
    graph = getattr(getattr(model, 'graph_module', None), 'graph', None)
    if graph is not None and not any(n.op == 'call_module' and n.target == name for n in graph.nodes):
        raise ValueError(f"{type(model).__name__}: torch.fx traced through {name}, so no module gives its output; "
                         f"build the model with feature_cls='getter' or 'hook'.")
    for owner in [model, *owners]:
        for candidate in (name, flat, flat.replace('.', '_')):
            with contextlib.suppress(AttributeError):
                return owner.get_submodule(candidate)
    raise ValueError(f'{type(model).__name__}: its deepest tap {name} is not a module of it; give a whole DenseNet.')


def _cam_class(method: str) -> Any:
    if method not in METHODS:
        raise ValueError(f'method={method!r}: unknown; give one of {", ".join(METHODS)}.')
    try:
        import pytorch_grad_cam
    except ImportError:
        raise ImportError(f'class activation maps need pytorch-grad-cam: {_INSTALL_HINT}.') from None
    return getattr(pytorch_grad_cam, METHODS[method])


def _num_classes(model: nn.Module) -> int:
    """How many class scores the model returns: 0 for features, a pruned model or num_classes=0."""
    if type(model).__name__ in _FEATURE_WRAPPERS:
        return 0
    return int(getattr(model, 'num_classes', 0) or 0)


def _class_index(model: nn.Module, target: Union[int, str, None], method: str) -> Optional[int]:
    """The class to explain (None: the top class); ValueError for one the model does not have."""
    n = _num_classes(model)
    if method == 'eigencam':
        if target is not None:
            raise ValueError("method='eigencam' maps the features, not a class; leave out the target.")
        return None
    if n == 0:
        raise ValueError(f'{type(model).__name__}: returns no class scores (features_only, pruned, or num_classes=0); '
                         f"use method='eigencam', which needs no class, or a model that classifies.")
    if isinstance(target, str):
        names = _names(model)
        if target not in names:
            raise ValueError(f'{target!r}: not a class of the model; its classes are {_some(names)}.')
        return names.index(target)
    if target is not None and not 0 <= int(target) < n:
        raise ValueError(f'class index {target}: the model has classes 0 to {n - 1}.')
    return None if target is None else int(target)


def _names(model: nn.Module) -> List[str]:
    from .model_io import class_names
    if not hasattr(model, 'pretrained_cfg'):
        raise ValueError(f'{type(model).__name__}: keeps no class names; give the class as an index.')
    return class_names(model)


def _some(names: List[str], n: int = 5) -> str:
    """A few of `names`, for an error message."""
    return ', '.join(repr(s) for s in names[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '')


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device('cpu')


def _preprocessed(model: nn.Module, image: ImageInput) -> Tuple[torch.Tensor, np.ndarray]:
    """The model's input (1, C, H, W) and the picture it shows (H, W, 3 floats in 0..1, before normalisation)."""
    from .images import read_image
    from .model_io import image_mode, preprocessing
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f'a tensor of shape {list(image.shape)}: give one preprocessed image, (C, H, W).')
        mean, std = (cfg['mean'], cfg['std']) if cfg else (None, None)
    else:
        if cfg is None:
            raise ValueError(f'{type(model).__name__}: keeps no preprocessing config; give the image as a '
                             f'preprocessed tensor.')
        picture = (image if isinstance(image, Image.Image) else read_image(image)).convert(image_mode(model))
        transform = preprocessing(model)
        x = transform(picture).unsqueeze(0)
        normalize = transform.transforms[-1]
        mean, std = normalize.mean.tolist(), normalize.std.tolist()
    x = x.detach().float()
    if mean is None:  # no statistics to undo: the tensor's own range
        seen = (x[0] - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    else:
        seen = x[0] * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    seen = seen.clamp(0, 1).expand(3, -1, -1) if seen.shape[0] == 1 else seen.clamp(0, 1)[:3]
    return x.to(_device(model)), seen.permute(1, 2, 0).numpy().astype(np.float32)


@contextlib.contextmanager
def _gradients_from(model: nn.Module, layer: nn.Module) -> Iterator[None]:
    """Autograd from `layer`'s output on: the model's parameters stop requiring gradients for the call and the layer's
    output starts a new graph, so nothing before it is recorded. Mode, flags and `.grad` are restored afterwards."""
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    training = model.training
    handle = layer.register_forward_hook(lambda module, args, out: out.detach().requires_grad_())
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p, (requires_grad, grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(training)


class _AnyOutput:
    """A target for methods that use none (eigencam), on models whose output is not class scores."""

    def __call__(self, output: Any) -> torch.Tensor:
        return torch.zeros(())


def explain(
        model: nn.Module,
        image: ImageInput,
        target: Union[int, str, None] = None,
        *,
        method: str = 'gradcam',
        overlay: Union[str, Path, None] = None,
        force: bool = False,
) -> np.ndarray:
    """The class activation map of `target` in `image`: an (H, W) float32 array in [0, 1] at the size the model saw.

    `image`: an image file (read by `images.read_image`) or a PIL image, preprocessed as the model's pretrained
    config says (`predict.preprocessing`); or a tensor (C, H, W) already preprocessed. `target`: a class index, a
    class name (`predict.class_names`), or None for the top class. `method`: one of `METHODS` (pytorch-grad-cam's),
    at `target_layer(model)`. `overlay`: also write the image the model saw (resized and cropped) with the map on it
    as a PNG file there; an existing file is replaced only with `force`.
    """
    cam_class = _cam_class(method)
    layer = target_layer(model)
    index = _class_index(model, target, method)
    x, seen = _preprocessed(model, image)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    if index is not None:
        targets = [ClassifierOutputTarget(index)]
    else:
        targets = [_AnyOutput()] if method == 'eigencam' else None
    with _gradients_from(model, layer):
        cam = cam_class(model=model, target_layers=[layer])
        try:  # not `with cam`: its __exit__ prints an IndexError and swallows it
            heatmap = cam(input_tensor=x, targets=targets)[0]
        finally:
            cam.activations_and_grads.release()
    heatmap = np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0, 1)
    if overlay is not None:
        _write_overlay(seen, heatmap, Path(overlay), force)
    return heatmap


def _write_overlay(seen: np.ndarray, heatmap: np.ndarray, path: Path, force: bool) -> None:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from ._files import writing
    picture = show_cam_on_image(seen, heatmap, use_rgb=True)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    with writing(path, force=force, exists_message=f'{path}: exists; pass {arg("force")} to replace it.') as tmp:
        Image.fromarray(picture).save(tmp, format='PNG')


class _CallableModule(types.ModuleType):
    """This module, callable as its function: `timm_densenet_ext.explain(...)` runs `explain` whether the package's
    name is bound to the function (its lazy export) or to this module (bound by any `import timm_densenet_ext.explain`
    or `from timm_densenet_ext.explain import ...`, which takes precedence)."""

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
