"""Model cards: the Hub README.md of each pretrained tag, rendered from the registry and the model itself.

The card's text is the Jinja2 template `model_card_template.md` (linked from `model_cards/TEMPLATE.md`). Everything a
card states about the model (statistics, preprocessing, feature pyramid, the shapes its usage code prints) is measured
here from the model built on the meta device, so a card cannot drift from the code; about the weights, it states only
what is known (a published tag's registry entry, or what the caller passes). The Hub metadata goes through
huggingface_hub's `ModelCardData` and `ModelCard.from_template`. `timm-densenet-ext card --all --force`, run from the
repository's root, regenerates its `model_cards/`.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from huggingface_hub import ModelCard, ModelCardData
from timm.layers import BlurPool2d

from ._files import claim, writing
from ._naming import arg
from .stats import measure
from .models import default_cfgs, resolve_model_name

__all__ = ['CARD_DIR', 'TEMPLATE_PATH', 'CITATIONS', 'card_model_names', 'card_path', 'check_card_facts',
           'render_model_card', 'write_model_card', 'write_model_cards']

# where `card --all` writes the cards when given no folder: model_cards/ in the current folder (relative, so that an
# installed package writes where it is run, never into site-packages); the repository's cards are its model_cards/
CARD_DIR = Path('model_cards')
# the one file read at run time: package data (pyproject's package-data), so wheels render cards too;
# model_cards/TEMPLATE.md links to it
TEMPLATE_PATH = Path(__file__).resolve().parent / 'model_card_template.md'

CITATIONS = {
    'densenet': """@inproceedings{huang2017densely,
  title={Densely Connected Convolutional Networks},
  author={Huang, Gao and Liu, Zhuang and van der Maaten, Laurens and Weinberger, Kilian Q.},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={4700--4708},
  year={2017}
}""",
    'blurpool': """@inproceedings{zhang2019shiftinvar,
  title={Making Convolutional Networks Shift-Invariant Again},
  author={Zhang, Richard},
  booktitle={Proceedings of the 36th International Conference on Machine Learning (ICML)},
  pages={7324--7334},
  year={2019}
}""",
    'timm': """@misc{rw2019timm,
  author={Ross Wightman},
  title={PyTorch Image Models},
  year={2019},
  publisher={GitHub},
  journal={GitHub repository},
  doi={10.5281/zenodo.4414861},
  howpublished={\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
    'rsb': """@inproceedings{wightman2021resnet,
  title={ResNet strikes back: An improved training procedure in timm},
  author={Wightman, Ross and Touvron, Hugo and J{\\'e}gou, Herv{\\'e}},
  booktitle={NeurIPS 2021 Workshop on ImageNet: Past, Present, and Future},
  year={2021}
}""",
    'randaugment': """@inproceedings{cubuk2020randaugment,
  title={RandAugment: Practical Automated Data Augmentation with a Reduced Search Space},
  author={Cubuk, Ekin D. and Zoph, Barret and Shlens, Jonathon and Le, Quoc V.},
  booktitle={Advances in Neural Information Processing Systems},
  volume={33},
  pages={18613--18624},
  year={2020}
}""",
    'torchvision': """@software{torchvision2016,
  title={TorchVision: PyTorch's Computer Vision library},
  author={TorchVision maintainers and contributors},
  year={2016},
  journal={GitHub repository},
  publisher={GitHub},
  howpublished={\\url{https://github.com/pytorch/vision}}
}""",
}

_PAPERS = {
    'blurpool': ('Making Convolutional Networks Shift-Invariant Again', 'https://arxiv.org/abs/1904.11486'),
    'randaugment': ('RandAugment: Practical automated data augmentation with a reduced search space',
                    'https://arxiv.org/abs/1909.13719'),
    'rsb': ('ResNet strikes back: An improved training procedure in timm', 'https://arxiv.org/abs/2110.00476'),
}

# pretrained-tag tokens naming a dataset: Hub dataset id, display name
_DATASETS = {
    'in1k': ('imagenet-1k', 'ImageNet-1k'),
    'in21k': ('imagenet-21k', 'ImageNet-21k'),
    'in22k': ('imagenet-22k', 'ImageNet-22k'),
}


@dataclass(frozen=True)
class _Recipe:
    """Where the weights of a tag prefix come from: a sentence (str.format fields below) and what to cite."""
    source: str  # fields: {dataset}, {arch}, {tv_weights}, {origin}
    papers: Tuple[str, ...] = ()
    citations: Tuple[str, ...] = ()


_RECIPES = {
    'ra': _Recipe(
        'Trained on {dataset} in timm by Ross Wightman with the RandAugment `RA` recipe (RandAugment, RMSProp with '
        'TF 1.0 behaviour, EMA weight averaging, step LR schedule with warmup), which is related to the `B` recipe '
        'of ResNet strikes back.',
        papers=('randaugment', 'rsb'), citations=('timm', 'rsb', 'randaugment')),
    'tv': _Recipe(
        "torchvision's `{tv_weights}.IMAGENET1K_V1` weights, trained on {dataset} by torchvision and republished "
        'by timm in safetensors.',
        citations=('torchvision',)),
}
_UNKNOWN_RECIPE = _Recipe('Pretrained weights from {origin}.')
# a license identifier as the Hub's metadata takes it: apache-2.0, cc-by-nc-4.0, other, ...
_LICENSE_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9.+\-]*')


def card_model_names() -> List[str]:
    """Every registered pretrained tag with weights of its own: one per Hub repository, as 'arch.tag', sorted.

    Tags that share a repository (tv_densenet121.tv_in1k loads timm/densenet121.tv_in1k) get one card, under the
    name the repository is called by.
    """
    by_repo: Dict[str, List[str]] = {}
    for arch, default_cfg in default_cfgs.items():
        for tag, cfg in default_cfg.cfgs.items():
            if cfg.has_weights:
                by_repo.setdefault(cfg.hf_hub_id or str(cfg.url or cfg.file), []).append(f'{arch}.{tag}')
    names = []
    for repo, tagged in by_repo.items():
        own = [n for n in tagged if repo.split('/')[-1] == n]
        names.append(own[0] if own else tagged[0])
    return sorted(names)


def card_path(model_name: str, out_dir: Union[str, Path, None] = None) -> Path:
    """Where `write_model_cards` puts the card of 'arch.tag'."""
    return Path(out_dir or CARD_DIR) / f'{model_name}.md'


def _size(input_size) -> str:
    return f'{input_size[-2]} x {input_size[-1]}'


def _measure(name: str, cfg: Dict[str, Any], model_args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a card states about the model, measured from it on the meta device (no memory, no compute)."""
    model_args = dict(model_args or {}, num_classes=cfg['num_classes'], in_chans=cfg['input_size'][0])
    with torch.device('meta'):
        model = timm.create_model(name, **model_args).eval()
        with torch.no_grad():
            # the maps at feature_info's taps: what features_only=True returns
            unpooled, feature_maps = model.forward_intermediates(torch.empty((1, *cfg['input_size'])))
            embedding = model.forward_head(unpooled, pre_logits=True)
            logits = model.forward_head(unpooled)

    sizes = [('input size', cfg['input_size'])]
    if cfg.get('test_input_size') and tuple(cfg['test_input_size']) != tuple(cfg['input_size']):
        sizes.append(('test input size', cfg['test_input_size']))
    stats_rows = []
    for label, input_size in sizes:
        s = measure(model, tuple(input_size))
        stats_rows.append(dict(label=label, size=_size(input_size), params=f'{s.params:,}', gmacs=f'{s.gmacs:.2f}',
                               activations=f'{s.activations_m:.2f}'))

    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))
    resize = next((t.size for t in transform.transforms if type(t).__name__ == 'Resize'), None)
    pre = dict(
        input_size=_size(cfg['input_size']), crop_pct=cfg['crop_pct'], resize=resize,
        interpolation=cfg['interpolation'], mean=tuple(cfg['mean']), std=tuple(cfg['std']),
        test_input_size=_size(sizes[1][1]) if len(sizes) > 1 else None, test_crop_pct=cfg.get('test_crop_pct'))

    info = model.feature_info
    return dict(
        stats_rows=stats_rows,
        pre=pre,
        pyramid=[dict(index=i, channels=f['num_chs'], reduction=f['reduction'], module=f['module'],
                      size=_size(x.shape)) for i, (f, x) in enumerate(zip(info, feature_maps))],
        channels=[f['num_chs'] for f in info],
        reductions=[f['reduction'] for f in info],
        feature_shapes=[repr(x.shape) for x in feature_maps],
        logits_shape=repr(logits.shape),
        embedding_shape=repr(embedding.shape),
        unpooled_shape=repr(unpooled.shape),
        blur=any(isinstance(m, BlurPool2d) for m in model.modules()),
    )


# model arguments a checkpoint itself determines: they leave the variant's architecture as its docstring says
HEAD_ARGS = ('num_classes', 'in_chans', 'global_pool')


def _arch_doc(arch: str, model_args: Optional[Dict[str, Any]] = None) -> str:
    """The architecture in a few words: its entrypoint's first docstring line, less any words on weights (the
    card's weights are described by their own facts, not by the architecture's name); for a model built with other
    arguments (e.g. block_config), the variant and those arguments, since the docstring's figures no longer hold."""
    changed = {k: v for k, v in (model_args or {}).items() if k not in HEAD_ARGS}
    if changed:
        return f'{arch} built with ' + ', '.join(f'{k}={v!r}' for k, v in sorted(changed.items()))
    doc = (timm.models.model_entrypoint(arch).__doc__ or arch).strip().splitlines()[0].rstrip('.')
    return re.sub(r"\s+with \S+ weights$", '', doc)


def _eval_results(repo_id: str, training: Dict[str, Any]) -> Dict[str, Any]:
    """The measured validation accuracy (a multi-label model's mean AUROC) as the Hub's model-index metadata
    (huggingface_hub's EvalResult)."""
    from huggingface_hub import EvalResult
    metric = dict(metric_type='accuracy', metric_name='Validation accuracy',
                  metric_value=round(training['val_accuracy'], 4))
    if training.get('multi_label'):
        metric = dict(metric_type='roc_auc', metric_name='Mean validation AUROC',
                      metric_value=round(training['multi_label']['mean_auroc'], 4))
    return dict(model_name=repo_id.split('/')[-1], eval_results=[EvalResult(
        task_type='image-classification', dataset_type='imagefolder', dataset_name=training['data_name'],
        dataset_split='validation', **metric)])


def check_card_facts(
        base_model: Optional[str], datasets: Union[str, Sequence[str], None], license: Optional[str],
) -> Tuple[Optional[str], List[str], Optional[str]]:
    """The facts a caller states about the weights, checked: a Hub repository id for `base_model` (a published tag
    such as 'densenet121.ra_in1k' stands for its repository), Hub dataset ids, a license identifier."""
    from huggingface_hub.utils import validate_repo_id
    if base_model is not None:
        if '/' not in base_model:
            try:
                arch, tag = resolve_model_name(base_model)
            except ValueError:
                arch = tag = None
            repo = default_cfgs[arch].cfgs[tag].hf_hub_id if arch else None
            if not repo:
                raise ValueError(
                    f'{arg("base_model", repr(base_model))}: give the Hub repository of the weights these were '
                    f'trained from, as ORG/NAME, or a published tag such as densenet121.ra_in1k.')
            base_model = repo
        try:
            validate_repo_id(base_model)
        except ValueError:
            raise ValueError(
                f'{arg("base_model", repr(base_model))}: not a Hub repository id; give it as ORG/NAME.') from None
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    for dataset in datasets:
        try:
            validate_repo_id(dataset)
        except ValueError:
            raise ValueError(
                f'{arg("datasets", repr(dataset))}: not a Hub dataset id; give it as on the Hub, e.g. imagenet-1k or '
                f'ORG/NAME.') from None
    if license is not None and not _LICENSE_ID.fullmatch(license):
        raise ValueError(
            f'{arg("license", repr(license))}: give a license identifier as the Hub lists them, e.g. apache-2.0, mit, '
            f'cc-by-4.0, or other.')
    return base_model, datasets, license


def render_model_card(
        model_name: str,
        *,
        repo_id: Optional[str] = None,
        pretrained_cfg: Optional[dict] = None,
        weights_source: Optional[str] = None,
        training: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        base_model: Optional[str] = None,
        datasets: Union[str, Sequence[str], None] = None,
        license: Optional[str] = None,
) -> str:
    """The model card (Hub README.md: YAML metadata, then markdown) of 'arch' or 'arch.tag'.

    Without `pretrained_cfg`, for the tag's own Hub repository, the card describes the tag's published weights and
    states what the registry knows of them: their source, data, recipe, license and papers. Any other card (other
    weights, or another repository: `repo_id`) states only what the arguments say; the rest is omitted or "not
    stated", never taken from the tag.

    `pretrained_cfg` overrides the registered config (a hub folder's config.json: num_classes, label_names,
    preprocessing); `repo_id` is the Hub repository the usage code loads (default the config's hf_hub_id);
    `weights_source` is a sentence saying where the weights came from. `training` (from `finetune`: data, classes,
    image counts, recipe lines, per-epoch history, best epoch and its validation accuracy) adds a Training section
    and the accuracy as the card's evaluation result. `model_args` are the arguments the model was built with beyond
    the variant's (config.json `model_args`). `base_model` (the Hub repository the weights were fine-tuned from, or a
    published tag), `datasets` (Hub dataset ids) and `license` (a license identifier) go into the metadata and text.
    """
    card = _card_subject(model_name, repo_id, pretrained_cfg)
    base_model, datasets, license = check_card_facts(base_model, datasets, license)
    weights = _weights_facts(card, weights_source, training, datasets, license)
    figures = _measure(card.name, card.cfg, model_args)
    blur = figures.pop('blur')
    papers, citations = _references(card.cfg, weights.recipe, blur)
    text = str(ModelCard.from_template(
        _card_data(card, weights, base_model, blur, training),
        template_path=str(TEMPLATE_PATH),
        title=card.name if card.own_repo else card.repo_id,
        arch=card.arch,
        arch_doc=_arch_doc(card.arch, model_args),
        repo_id=card.repo_id,
        model_ref=card.name if card.own_repo else f'hf-hub:{card.repo_id}',
        aliases=_aliases(card),
        weights_source=weights.source,
        published=card.published,
        base_model=base_model,
        dataset_text=weights.dataset_text,
        num_classes=card.cfg['num_classes'],
        license_id=weights.license,
        origin_url=card.cfg.get('origin_url') if card.published else None,
        papers=papers,
        labels=_label_source(card, weights.datasets),
        citations=[CITATIONS[c] for c in citations],
        training=training,
        multi_label=_multi_label(card.cfg),
        image_mode='L' if card.cfg['input_size'][0] == 1 else 'RGB',
        **figures,
    ))
    return text if text.endswith('\n') else text + '\n'


@dataclass(frozen=True)
class _Subject:
    """The tag a card describes, its config (the registered one with the caller's overrides) and its repository."""
    arch: str
    tag: str
    registered: Dict[str, Any]
    cfg: Dict[str, Any]
    repo_id: str
    own_repo: bool  # the tag's own Hub repository
    published: bool  # the tag's published weights: the registry's facts describe them

    @property
    def name(self) -> str:
        return f'{self.arch}.{self.tag}'


def _card_subject(model_name: str, repo_id: Optional[str], pretrained_cfg: Optional[dict]) -> _Subject:
    arch, tag = resolve_model_name(model_name)
    name = f'{arch}.{tag}'
    registered = timm.models.get_pretrained_cfg(name).to_dict()
    cfg = {**registered, **(pretrained_cfg or {})}
    if pretrained_cfg is not None:  # a test size measured for the tag's weights, not these (nor their input channels)
        for key in ('test_input_size', 'test_crop_pct'):
            if key not in pretrained_cfg:
                cfg.pop(key, None)
    repo_id = repo_id or cfg.get('hf_hub_id')
    if not repo_id:
        raise ValueError(
            f'{name} has no published weights; give the Hub repository that holds them ({arg("repo_id", "ORG/NAME")}).')
    own_repo = repo_id == registered.get('hf_hub_id')
    # the registry's facts describe the tag's published weights only: not a checkpoint converted "as" the tag
    return _Subject(arch, tag, registered, cfg, repo_id, own_repo, published=own_repo and pretrained_cfg is None)


@dataclass(frozen=True)
class _WeightsFacts:
    """What a card says about the weights: the registry's for published ones, else only what the caller gave."""
    recipe: _Recipe
    source: str
    datasets: List[str]
    dataset_text: str
    license: Optional[str]


def _weights_facts(card: _Subject, weights_source: Optional[str], training: Optional[Dict[str, Any]],
                   datasets: List[str], license: Optional[str]) -> _WeightsFacts:
    recipe = _RECIPES.get(card.tag.split('_')[0], _UNKNOWN_RECIPE) if card.published else _Recipe('')
    dataset_text = None
    if card.published:
        tag_datasets = [_DATASETS[t] for t in card.tag.split('_') if t in _DATASETS]
        if not datasets:
            datasets = [d[0] for d in tag_datasets]
            dataset_text = ', '.join(d[1] for d in tag_datasets) or None
        license = license or card.cfg.get('license')
        if weights_source is None:
            origin = card.registered.get('origin_url') or (
                f'the [{card.repo_id}](https://huggingface.co/{card.repo_id}) repository')
            weights_source = recipe.source.format(
                dataset=' and '.join(d[1] for d in tag_datasets) or 'its dataset', arch=card.arch,
                tv_weights=card.arch.replace('densenet', 'DenseNet') + '_Weights', origin=origin)
    if dataset_text is None:
        dataset_text = (', '.join(datasets) if datasets else
                        f'{training["data_name"]} (see Training)' if training else 'not stated')
    if weights_source is None:
        weights_source = 'Where these weights come from is not stated.'
    return _WeightsFacts(recipe, weights_source, datasets, dataset_text, license)


def _card_data(card: _Subject, weights: _WeightsFacts, base_model: Optional[str], blur: bool,
               training: Optional[Dict[str, Any]]) -> ModelCardData:
    """The card's Hub metadata (its YAML header)."""
    return ModelCardData(
        library_name='timm',
        license=weights.license,
        tags=['image-classification', 'timm', 'densenet', 'timm-densenet-ext'] + (['blurpool'] if blur else []),
        datasets=weights.datasets or None,
        pipeline_tag='image-classification',
        base_model=base_model,
        **(_eval_results(card.repo_id, training) if training else {}),
    )


def _references(cfg: Dict[str, Any], recipe: _Recipe, blur: bool) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(paper title, link) and CITATIONS keys: the architecture's papers always, a recipe's only for its weights."""
    papers = []
    if cfg.get('paper_name') and cfg.get('paper_ids'):
        ids = cfg['paper_ids'] if isinstance(cfg['paper_ids'], (list, tuple)) else [cfg['paper_ids']]
        papers += [(cfg['paper_name'], 'https://arxiv.org/abs/' + i.split(':', 1)[1]) for i in ids
                   if i.startswith('arXiv:')]
    citations = ['densenet'] + (['blurpool'] if blur else []) + list(recipe.citations)
    papers += [_PAPERS[c] for c in (['blurpool'] if blur else []) + list(recipe.papers)]
    return papers, citations


def _multi_label(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A multi-label model's labels and their thresholds (a hub folder's config.json keys), else None."""
    from .multilabel import PROBLEM_TYPE, THRESHOLD_RULES
    if cfg.get('problem_type') != PROBLEM_TYPE or not cfg.get('label_thresholds'):
        return None
    rule = THRESHOLD_RULES.get(cfg.get('threshold_rule'))
    return dict(labels=list(cfg.get('label_names') or []), thresholds=[round(t, 4) for t in cfg['label_thresholds']],
                rule=rule)


def _aliases(card: _Subject) -> List[str]:
    """The other registered names that load the same published repository."""
    if not card.own_repo:
        return []
    return [f'{a}.{t}' for a, d in default_cfgs.items() for t, c in d.cfgs.items()
            if c.hf_hub_id == card.repo_id and f'{a}.{t}' != card.name]


def _label_source(card: _Subject, datasets: Sequence[str]) -> str:
    """Where the usage code's class names come from: the config's label_names, ImageNet's, or class indices."""
    if card.cfg.get('label_names') and not card.own_repo:
        return 'cfg'
    if card.cfg['num_classes'] == 1000 and 'imagenet-1k' in datasets:
        return 'imagenet'
    return 'index'


def _write_text(path: Path, text: str, force: bool) -> None:
    """Write `text` to `path` through a temporary file (never over a file unless `force`)."""
    with claim(path), writing(path, force=force, exists_message=_exists_message(path)) as tmp:
        tmp.write_bytes(text.encode('utf-8'))


def _exists_message(path: Path) -> str:
    return f'{path} exists; pass {arg("force")} to overwrite it.'


def write_model_card(model_name: str, out: Union[str, Path], *, force: bool = False, **render_kwargs: Any) -> Path:
    """Render the card of 'arch[.tag]' into the file `out`; an existing file is kept unless `force`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out):
        if out.exists() and not force:  # before rendering, which takes a while
            raise FileExistsError(_exists_message(out))
        _write_text(out, render_model_card(model_name, **render_kwargs), force)
    return out


def write_model_cards(out_dir: Union[str, Path, None] = None, *, force: bool = False) -> List[Path]:
    """Render the card of every `card_model_names()` tag into `out_dir` (default `CARD_DIR`: model_cards/ in the
    current folder, the repository's own when run from its root).

    A card file that exists with other text is overwritten only with `force`; without it nothing is written. Files
    that already hold the rendered text are left as they are.
    """
    cards = [(card_path(name, out_dir), render_model_card(name)) for name in card_model_names()]
    differ = [path for path, text in cards if path.exists() and path.read_bytes() != text.encode('utf-8')]
    if differ and not force:
        more = f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''
        raise FileExistsError(
            f'{differ[0]}{more} exists with other text; pass {arg("force")} to overwrite it with the card '
            f'rendered now.')
    Path(out_dir or CARD_DIR).mkdir(parents=True, exist_ok=True)
    for path, text in cards:
        if path in differ or not path.exists():  # a file that appeared since is refused unless `force`
            _write_text(path, text, force=force)
    return [path for path, _ in cards]
