"""`timm-densenet-ext`: the package's functions from the command line.

Each subcommand parses its arguments and calls one public function. Errors the user can fix are raised as
`CliError` (or ValueError/FileNotFoundError from the library) and printed as one line with exit code 2.
"""
import argparse
import json
import sys
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ['main', 'CliError', 'list_models_table', 'model_info']


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _import_models():
    import timm
    import timm_densenet_ext
    return timm, timm_densenet_ext


def list_models_table() -> List[Dict[str, object]]:
    """One row per registered variant: name, parameters, GMACs at its default input size, pretrained tags."""
    timm, ext = _import_models()
    from .stats import model_stats
    rows = []
    for name in ext.MODEL_NAMES:
        stats = model_stats(name)
        tags = [t for t in ext.default_cfgs[name].tags if ext.default_cfgs[name].cfgs[t].has_weights]
        rows.append(dict(
            name=name, params=stats.params, gmacs=stats.gmacs, input_size=stats.input_size, pretrained_tags=tags))
    return rows


def model_info(model_name: str) -> Dict[str, object]:
    """A variant's pretrained config, feature pyramid (channels, reductions, modules), parameters and GMACs."""
    timm, ext = _import_models()
    import torch
    from .stats import measure
    arch = model_name.split('.', 1)[0]
    if arch not in ext.MODEL_NAMES:
        raise CliError(f'unknown model {model_name!r}; `timm-densenet-ext list` shows the {len(ext.MODEL_NAMES)} variants.')
    try:
        with torch.device('meta'):
            model = timm.create_model(model_name)
    except RuntimeError as e:  # unknown pretrained tag
        raise CliError(f'{model_name}: {e}') from None
    cfg = {k: v for k, v in model.pretrained_cfg.items() if v is not None}
    stats = measure(model, tuple(cfg['input_size']))
    return dict(
        name=model_name,
        pretrained_cfg=cfg,
        pretrained_tags=list(ext.default_cfgs[arch].tags),
        feature_info=[dict(index=i, **f) for i, f in enumerate(model.feature_info)],
        params=stats.params,
        gmacs=stats.gmacs,
        activations_m=stats.activations_m,
        input_size=stats.input_size,
        min_input_size=model.min_input_size,
    )


def _cmd_list(args: argparse.Namespace) -> None:
    rows = list_models_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = f'{"name":<22}{"params":>14}{"GMACs":>9}  {"input":<10}pretrained tags'
    print(header)
    print('-' * len(header))
    for r in rows:
        size = 'x'.join(str(s) for s in r['input_size'][1:])
        print(f'{r["name"]:<22}{r["params"]:>14,}{r["gmacs"]:>9.2f}  {size:<10}{", ".join(r["pretrained_tags"]) or "-"}')


def _cmd_info(args: argparse.Namespace) -> None:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f'{info["name"]}')
    print(f'  parameters      {info["params"]:,}')
    size = 'x'.join(str(s) for s in info['input_size'])
    print(f'  GMACs           {info["gmacs"]:.2f} at {size}')
    print(f'  activations (M) {info["activations_m"]:.2f} at {size}')
    print(f'  min input size  {info["min_input_size"]}x{info["min_input_size"]}')
    print(f'  pretrained tags {", ".join(info["pretrained_tags"])}')
    print('  feature_info (features_only=True, out_indices index: channels, reduction, module)')
    for f in info['feature_info']:
        print(f'    {f["index"]}: {f["num_chs"]:>5} ch  stride {f["reduction"]:>2}  {f["module"]}')
    print('  pretrained_cfg')
    for k, v in info['pretrained_cfg'].items():
        print(f'    {k:<18}{v}')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-densenet-ext', description='DenseNet variants for timm: inspect, convert, publish.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = sub.add_parser('list', help='table of every variant: parameters, GMACs, pretrained tags')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('info', help="a variant's pretrained config, feature pyramid, parameters and GMACs")
    p.add_argument('model', help='variant name, optionally with a pretrained tag (densenet121.tv_in1k)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.set_defaults(func=_cmd_info)

    for add in _EXTRA_COMMANDS:
        add(sub)
    return parser


# Further subcommands register here: each is a function taking the subparsers object.
_EXTRA_COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f'timm-densenet-ext {args.command}: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
