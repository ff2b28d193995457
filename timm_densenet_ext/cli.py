"""`timm-densenet-ext`: the package's functions from the command line.

Each subcommand parses its arguments and calls one public function. Errors the user can fix are raised as
`CliError` (or ValueError/FileNotFoundError from the library) and printed as one line with exit code 2.
"""
import argparse
import json
import sys
from pathlib import Path
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
        prog='timm-densenet-ext',
        description='DenseNet variants for timm: classify, fine-tune, export, inspect, convert, publish.')
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


def _cmd_card(args: argparse.Namespace) -> None:
    from .cards import render_model_card, write_model_card, write_model_cards
    if args.all:
        if args.model or args.repo_id:
            raise CliError('--all renders every pretrained tag; give it without MODEL or --repo-id.')
        for path in write_model_cards(args.out):
            print(path)
    elif not args.model:
        raise CliError('give a MODEL[.TAG] to render, or --all to regenerate every card.')
    elif args.out:
        print(write_model_card(args.model, args.out, force=args.force, repo_id=args.repo_id))
    else:
        sys.stdout.write(render_model_card(args.model, repo_id=args.repo_id))


def _add_card(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('card', help="render a pretrained tag's model card (the README.md of its Hub repository)")
    p.add_argument('model', nargs='?', metavar='MODEL[.TAG]', help='variant, optionally with a pretrained tag')
    p.add_argument('--all', action='store_true', help='regenerate the card of every pretrained tag in model_cards/')
    p.add_argument('--out', metavar='PATH', help='write the card to this file (with --all: into this folder)')
    p.add_argument('--force', action='store_true', help='overwrite an existing --out file')
    p.add_argument('--repo-id', help="the Hub repository the usage code loads (default: the tag's own)")
    p.set_defaults(func=_cmd_card)


_EXTRA_COMMANDS.append(_add_card)


def _print_files(files: Sequence) -> None:
    def size(n: float) -> str:
        for unit in ('B', 'kB', 'MB', 'GB'):
            if n < 1000 or unit == 'GB':
                return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
            n /= 1000
    for name, n in files:
        print(f'  {name:<24}{size(n):>10}')
    print(f'  {len(files)} files, {size(sum(n for _, n in files))}')


def _cmd_convert(args: argparse.Namespace) -> None:
    from .hub import convert_checkpoint, upload_files
    out = convert_checkpoint(
        args.checkpoint, args.model, args.out, num_classes=args.num_classes, force=args.force,
        repo_id=args.repo_id, use_ema=not args.no_ema)
    config = json.loads((out / 'config.json').read_text())
    print(f'wrote {out} ({config["architecture"]}, {config["num_classes"]} classes):')
    _print_files(upload_files(out))
    print(f"load it: timm.create_model('local-dir:{out}'); publish it: "
          f"timm-densenet-ext push {out} --repo-id {args.repo_id or 'ORG/NAME'}")


def _cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_folder
    result = push_folder(
        args.folder, args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr, dry_run=args.dry_run)
    target = result.repo_id + (f' (branch {result.revision})' if result.revision else '')
    print(f'{"would upload" if result.dry_run else "uploaded"} to {target}:')
    _print_files(result.files)
    print('dry run: nothing was uploaded.' if result.dry_run else (result.pr_url or result.commit_url))


def _add_convert_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('convert', help='convert a checkpoint into a hub folder (model.safetensors, config.json, card)')
    p.add_argument('checkpoint', help='torchvision or timm checkpoint (.pth, .pth.tar, .bin) or .safetensors file')
    p.add_argument('--model', required=True, metavar='MODEL[.TAG]',
                   help='the variant the checkpoint was trained as; a tag picks that preprocessing config')
    p.add_argument('--out', required=True, metavar='DIR', help='the folder to write')
    p.add_argument('--num-classes', type=int, metavar='N', help="check the classifier has N classes (default: read)")
    p.add_argument('--repo-id', metavar='ORG/NAME', help="the Hub repository the card's usage code loads")
    p.add_argument('--no-ema', action='store_true', help="read a training checkpoint's 'state_dict', not its EMA")
    p.add_argument('--force', action='store_true', help='replace an existing DIR (kept if the write fails)')
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('push', help='upload a hub folder to a Hugging Face Hub repository')
    p.add_argument('folder', metavar='DIR', help='a folder written by `convert`')
    p.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='the repository (created if missing)')
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', metavar='BRANCH', help='the branch to commit to (created if missing)')
    p.add_argument('--commit-message', metavar='M', help='the commit message')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--dry-run', action='store_true', help='validate and list the files; needs no token')
    p.set_defaults(func=_cmd_push)


_EXTRA_COMMANDS.append(_add_convert_push)


def _add_weights_args(p: argparse.ArgumentParser, what: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument('--pretrained', action='store_true', help=f"{what} the Hub's weights of the variant's tag")
    group.add_argument('--weights', metavar='PATH',
                       help=f'{what} the weights of a checkpoint file (any format convert reads)')


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict
    results = predict(args.model, args.images, pretrained=args.pretrained, weights=args.weights, top_k=args.top_k)
    if args.json:
        print(json.dumps([dict(path=r.path, error=r.error, top=[
            dict(index=i, label=label, probability=p) for i, label, p in r.top]) for r in results], indent=2))
    else:
        for r in results:
            if r.error is None:
                print(r.path)
                for _, label, p in r.top:
                    print(f'  {100 * p:6.2f}%  {label}')
    for r in results:
        if r.error is not None:
            print(f'timm-densenet-ext predict: error: {r.error}', file=sys.stderr)
    return 2 if any(r.error for r in results) else 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import STATE_FILE, finetune
    try:
        result = finetune(
            args.model, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, img_size=args.img_size, hflip=args.hflip, scale=args.scale,
            seed=args.seed, pretrained=args.pretrained, weights=args.weights, resume=args.resume, force=args.force,
            repo_id=args.repo_id)
    except KeyboardInterrupt:
        state = Path(args.out) / STATE_FILE
        if state.is_file():
            print(f'\ninterrupted: {state} holds the last finished epoch; continue with the same command and '
                  f'--resume.', file=sys.stderr)
        return 130
    print(f'wrote {result.out_dir}: epoch {result.best_epoch}, validation accuracy {100 * result.val_accuracy:.2f}% '
          f'({result.val_correct}/{result.val_images}):')
    from .hub import upload_files
    _print_files(upload_files(result.out_dir))
    print(f"load it: timm.create_model('local-dir:{result.out_dir}', pretrained=True); publish it: "
          f"timm-densenet-ext push {result.out_dir} --repo-id {args.repo_id or 'ORG/NAME'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import CHECK_BATCH_SIZES, export_model
    result = export_model(args.model, args.format, args.out, pretrained=args.pretrained, weights=args.weights,
                          force=args.force)
    size = 'x'.join(str(s) for s in result.input_size)
    runtime = {'onnx': 'onnxruntime', 'torchscript': 'torch.jit.load', 'exported-program': 'torch.export.load'}
    print(f'wrote {result.path} ({result.format}, {result.size_bytes / 1e6:.1f} MB), input (batch, {size}) with a '
          f'dynamic batch axis; loaded with {runtime[result.format]}, it matches PyTorch to '
          f'{result.max_abs_diff:.1e} at batch sizes {" and ".join(map(str, CHECK_BATCH_SIZES))}.')


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    recipe = {'epochs': args.epochs} if args.epochs else {}
    run_demo(args.out, force=args.force, **recipe)


def _add_workflows(sub: argparse._SubParsersAction) -> None:
    model_help = ("a variant (densenet121, densenet121.tv_in1k), or a hub folder local-dir:DIR (from convert or "
                  "finetune), which brings its own weights and class names")
    p = sub.add_parser('predict', help='classify images: top-k class names and probabilities')
    p.add_argument('model', metavar='MODEL', help=model_help)
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    _add_weights_args(p, 'classify with')
    p.add_argument('--top-k', type=int, default=5, metavar='K', help='classes shown per image (default 5)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('finetune', help='fine-tune on an image folder (DIR/train, DIR/val) and write a hub folder')
    p.add_argument('--model', metavar='MODEL', help=model_help + '; the classifier is reset to the data\'s classes')
    p.add_argument('--data', metavar='DIR', help='holds train/ and val/, one sub-folder of images per class')
    p.add_argument('--out', required=True, metavar='DIR', help='the hub folder to write (the best epoch)')
    _add_weights_args(p, 'start from')
    p.add_argument('--epochs', type=int, metavar='N', help='epochs (default 10)')
    p.add_argument('--batch-size', type=int, metavar='B', help='batch size (default 32)')
    p.add_argument('--lr', type=float, metavar='LR', help='AdamW peak learning rate, cosine schedule (default 1e-3)')
    p.add_argument('--weight-decay', type=float, metavar='WD', help='AdamW weight decay (default 0.05)')
    p.add_argument('--img-size', type=int, metavar='PX', help="train and record this input size (default: the model's)")
    p.add_argument('--hflip', type=float, metavar='P', help='horizontal flip probability (default 0.5)')
    p.add_argument('--scale', type=float, nargs=2, metavar=('MIN', 'MAX'),
                   help='random-resized crop area range (default 0.08 1.0)')
    p.add_argument('--seed', type=int, metavar='S', help='seed of the classifier, batches and augmentation (default 0)')
    p.add_argument('--repo-id', metavar='ORG/NAME', help="the Hub repository the card's usage code loads")
    p.add_argument('--resume', action='store_true', help='continue the interrupted run in --out')
    p.add_argument('--force', action='store_true', help='replace an existing --out (kept if the run fails)')
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser('export', help='export to ONNX, TorchScript or torch.export, checked against PyTorch')
    p.add_argument('model', metavar='MODEL', help=model_help)
    p.add_argument('--format', required=True, choices=('onnx', 'torchscript', 'exported-program'))
    p.add_argument('--out', required=True, metavar='FILE', help='the file to write')
    _add_weights_args(p, 'export')
    p.add_argument('--force', action='store_true', help='replace an existing FILE')
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser('demo', help="offline: fine-tune DenseNet-BC on scikit-learn's digits, reload and measure it")
    p.add_argument('--out', default='densenet-demo', metavar='DIR',
                   help='where data/ and model/ go (default densenet-demo)')
    p.add_argument('--epochs', type=int, metavar='N', help='fewer epochs for a quick look (default: the demo recipe)')
    p.add_argument('--force', action='store_true', help='replace data/ and model/ of an earlier run in DIR')
    p.set_defaults(func=_cmd_demo)


_EXTRA_COMMANDS.append(_add_workflows)


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from .benchmark import run_from_args
    run_from_args(args)


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    from .benchmark import add_arguments
    p = sub.add_parser('benchmark', help="speed and memory side by side with timm's and torchvision's DenseNet")
    add_arguments(p)
    p.set_defaults(func=_cmd_benchmark)


_EXTRA_COMMANDS.append(_add_benchmark)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (CliError, ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError) as e:
        print(f'timm-densenet-ext {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
