"""Raw or normalised DenseNet feature taps under a detector: FasterRCNN on a small synthetic shapes problem.

Prints, for each setting and tap choice, the training loss (mean of the first and last 20 steps) and the box AP at
IoU 0.5 on held-out images, plus the spread of per-channel scales of the taps the pyramid receives. No pretrained
weights can be downloaded here, so the backbone starts from random weights in two ways:

* scratch: everything trains, BatchNorm in train mode (norm_layer=nn.BatchNorm2d, trainable_stages=5);
* frozen: BatchNorm statistics calibrated on the training images, then frozen (the default FrozenBatchNorm2d) with
  the stem and first stage frozen (trainable_stages=3), as a pretrained backbone is fine-tuned.

    python benchmarks/detection_taps.py --steps 200 --json detection_taps.json
"""
import argparse
import copy
import json
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FrozenBatchNorm2d, box_iou
from torchvision.transforms.functional import pil_to_tensor

from timm_densenet_ext.models.detection import fpn_backbone


def shapes_dataset(n: int, size: int, seed: int) -> List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Images of 1-3 filled rectangles (class 1) and ellipses (class 2) on textured noise, with their boxes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(bg).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        boxes, labels = [], []
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(size // 8, size // 2, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            label = int(rng.integers(1, 3))
            (draw.rectangle if label == 1 else draw.ellipse)(box, fill=colour)
            boxes.append(box)
            labels.append(label)
        out.append((pil_to_tensor(img).float() / 255.,
                    dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels))))
    return out


def average_precision(model: nn.Module, data: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> float:
    """Mean over classes of the all-point interpolated AP at IoU 0.5 (VOC style)."""
    model.eval()
    with torch.no_grad():
        preds = [model([img])[0] for img, _ in data]
    aps = []
    for cls in (1, 2):
        scored, n_gt = [], 0
        for p, (_, t) in zip(preds, data):
            gt = t['boxes'][t['labels'] == cls]
            n_gt += len(gt)
            keep = p['labels'] == cls
            boxes, scores = p['boxes'][keep], p['scores'][keep]
            taken = torch.zeros(len(gt), dtype=torch.bool)
            ious = box_iou(boxes, gt) if len(gt) and len(boxes) else torch.zeros(len(boxes), len(gt))
            for i in scores.argsort(descending=True).tolist():
                hit = False
                if len(gt):
                    iou, j = ious[i].max(0)
                    if iou >= 0.5 and not taken[j]:
                        taken[j] = hit = True
                scored.append((float(scores[i]), hit))
        scored.sort(key=lambda s: -s[0])
        hits = np.array([h for _, h in scored], dtype=np.float64)
        tp = np.cumsum(hits)
        recall = tp / max(n_gt, 1)
        precision = tp / np.arange(1, len(hits) + 1)
        # all-point interpolation
        mrec = np.concatenate([[0.], recall, [1.]])
        mpre = np.concatenate([[0.], precision, [0.]])
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])))
    return float(np.mean(aps))


def calibrate_batchnorm(model: nn.Module, images: List[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to those of `images` (cumulative average over the batches)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 8):
            model(torch.stack(images[i:i + 8]))


def tap_scale_spread(backbone: nn.Module, images: List[torch.Tensor], train: bool) -> List[float]:
    """Per tap: the ratio of the 90th to the 10th percentile of per-channel RMS (1 = evenly scaled channels).

    In the mode the detector trains in: trainable BatchNorms normalise with batch statistics.
    """
    body = copy.deepcopy(backbone.body).train(train)
    with torch.no_grad():
        taps = body(torch.stack(images[:16]))
    out = []
    for t in taps:
        rms = t.float().pow(2).mean((0, 2, 3)).sqrt()
        lo, hi = torch.quantile(rms, torch.tensor([0.1, 0.9]))
        out.append(float(hi / lo.clamp_min(1e-12)))
    return out


def run(setting: str, taps: str, args: argparse.Namespace, train, val) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    if setting == 'scratch':
        backbone = fpn_backbone(args.model, feature_taps=taps, norm_layer=nn.BatchNorm2d, trainable_stages=5)
    else:
        # calibrate first (trainable BatchNorm), then freeze as fpn_backbone does for pretrained weights
        probe = fpn_backbone(args.model, feature_taps=taps, norm_layer=nn.BatchNorm2d, trainable_stages=5)
        calibrate_batchnorm(probe.body, [img for img, _ in train[:64]])
        torch.manual_seed(args.seed)
        backbone = fpn_backbone(args.model, feature_taps=taps, norm_layer=FrozenBatchNorm2d, trainable_stages=3)
        missing = backbone.body.load_state_dict(probe.body.state_dict(), strict=False)
        assert not missing.missing_keys, missing
    spread = tap_scale_spread(backbone, [img for img, _ in train], train=setting == 'scratch')
    model = FasterRCNN(backbone, num_classes=3, min_size=args.size, max_size=args.size,
                       box_batch_size_per_image=128)  # torchvision's 512 make RoIAlign dominate on a CPU
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(train), (args.batch_size,), generator=gen).tolist()
        loss = sum(model([train[i][0] for i in idx], [train[i][1] for i in idx]).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.)
        opt.step()
        losses.append(loss.item())
        if args.verbose and step % 10 == 0:
            print(f'  step {step} loss {losses[-1]:.3f} {time.perf_counter() - start:.0f} s', flush=True)
    seconds = time.perf_counter() - start
    ap = average_precision(model, val)
    return dict(setting=setting, taps=taps, first20=float(np.mean(losses[:20])), last20=float(np.mean(losses[-20:])),
                ap50=ap, tap_spread=spread, finite=bool(np.all(np.isfinite(losses))), seconds=seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='densenet121')
    p.add_argument('--steps', type=int, default=200)
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.02)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--settings', default='frozen,scratch')
    p.add_argument('--json', help='also write the results here')
    p.add_argument('--verbose', action='store_true', help='print the loss every 10 steps')
    args = p.parse_args()
    train = shapes_dataset(256, args.size, seed=1)
    val = shapes_dataset(32, args.size, seed=2)
    results = []
    for setting in args.settings.split(','):
        for taps in ('raw', 'norm'):
            r = run(setting, taps, args, train, val)
            results.append(r)
            print(f"{setting:8s} {taps:5s} loss first20 {r['first20']:.3f} last20 {r['last20']:.3f} "
                  f"AP50 {r['ap50']:.3f} tap channel-scale spread (p90/p10) "
                  f"{' '.join(f'{s:.1f}' for s in r['tap_spread'])} ({r['seconds']:.0f} s)", flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)


if __name__ == '__main__':
    main()
