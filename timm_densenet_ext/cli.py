"""`timm-densenet-ext`: the package's functions from the command line.

Each subcommand parses its arguments and calls one public function. One grammar for every subcommand, timm's
scripts' (`-m/--model`, `-b/--batch-size`, `--topk`, `--checkpoint`, `--data-dir`, `--output`, `--img-size`,
`--pretrained`), with this tool's earlier names kept as aliases. Errors the user can fix are raised as `CliError`
(or ValueError/FileNotFoundError/... from the library, whose messages name flags while the CLI runs) and printed as
one line with exit code 2.
"""
import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


# ---- arguments shared by the subcommands: the same flags, help and aliases everywhere

_MODEL_HELP = ('a variant (densenet121, densenet121.tv_in1k), or a hub folder local-dir:DIR (from convert or '
               'finetune), which brings its own weights and class names')


def _add_model(p: argparse.ArgumentParser, help: str = _MODEL_HELP, positional: bool = True,
               required: bool = True) -> None:
    """-m/--model MODEL; `positional` also accepts it as the first argument, this tool's earlier form."""
    p.add_argument('-m', '--model', metavar='MODEL', help=help + ('' if required else ' (optional)'))
    if positional:
        p.add_argument('model_arg', nargs='?', metavar='MODEL', help='the same as -m/--model (the earlier form)')
    p.set_defaults(_model_required=required)


def _model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Optional[str]:
    """The model given either way; both, or neither when one is required, is a usage error."""
    positional = getattr(args, 'model_arg', None)
    if args.model and positional:
        parser.error(f'give the model once: -m {args.model} or {positional}, not both.')
    model = args.model or positional
    if args._model_required and not model:
        parser.error('give the model with -m/--model MODEL (a variant such as densenet121, or local-dir:DIR).')
    return model


def _add_output(p: argparse.ArgumentParser, what: str, required: bool = True, default: Optional[str] = None) -> None:
    p.add_argument('--output', '--out', dest='output', required=required, default=default,
                   metavar='DIR' if 'folder' in what else 'FILE', help=what + ('' if default is None else
                                                                           f' (default {default})'))


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument('--force', action='store_true', help=what)


def _add_weights(p: argparse.ArgumentParser, what: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument('--pretrained', action='store_true', help=f"{what} the Hub's weights of the variant's tag")
    group.add_argument('--checkpoint', '--weights', dest='checkpoint', metavar='PATH',
                       help=f'{what} the weights of a checkpoint file (any format convert reads)')


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument('--threads', type=int, metavar='N',
                   help="torch's CPU threads (default: chosen for the work, one for small images; OMP_NUM_THREADS "
                        'keeps torch\'s own)')


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument('--json', action='store_true', help='print JSON instead of text')


def _print_files(files: Sequence) -> None:
    def size(n: float) -> str:
        for unit in ('B', 'kB', 'MB', 'GB'):
            if n < 1000 or unit == 'GB':
                return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
            n /= 1000
    for name, n in files:
        print(f'  {name:<24}{size(n):>10}')
    print(f'  {len(files)} files, {size(sum(n for _, n in files))}')


def _print_next_steps(folder: Path, repo_id: Optional[str]) -> None:
    """What a hub folder's writer prints last: lines a user (and test_next_steps) runs exactly as printed."""
    from ._naming import program
    from .hub import load_code
    print('next:')
    print(f'  load it in Python: {load_code(folder)}')
    push = f'{program()} push {shlex.quote(str(folder))} --repo-id {repo_id or "ORG/NAME"}'
    print(f'  check the upload: {push} --dry-run')
    print(f'  publish it: {push}')


# ---- subcommands: each parses, calls one function, prints

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


def _cmd_card(args: argparse.Namespace) -> None:
    from .cards import render_model_card, write_model_card, write_model_cards
    if args.all:
        if args.model or args.repo_id or _card_facts(args):
            raise CliError('--all renders every published tag as published; give it without -m/--model, --repo-id, '
                           '--base-model, --dataset or --license.')
        for path in write_model_cards(args.output, force=args.force):
            print(path)
    elif not args.model:
        raise CliError('give -m/--model MODEL[.TAG] to render, or --all to regenerate every card.')
    elif args.output:
        print(write_model_card(args.model, args.output, force=args.force, repo_id=args.repo_id, **_card_facts(args)))
    else:
        sys.stdout.write(render_model_card(args.model, repo_id=args.repo_id, **_card_facts(args)))


def _cmd_convert(args: argparse.Namespace) -> None:
    from .hub import convert_checkpoint, upload_files
    checkpoint = args.checkpoint or args.checkpoint_arg
    if args.checkpoint and args.checkpoint_arg:
        raise CliError(f'give the checkpoint once: --checkpoint {args.checkpoint} or {args.checkpoint_arg}.')
    if not checkpoint:
        raise CliError('give the checkpoint file to convert: --checkpoint PATH.')
    out = convert_checkpoint(
        checkpoint, args.model, args.output, num_classes=args.num_classes, force=args.force,
        repo_id=args.repo_id, use_ema=not args.no_ema, **_card_facts(args))
    config = json.loads((out / 'config.json').read_text())
    print(f'wrote {out} ({config["architecture"]}, {config["num_classes"]} classes):')
    _print_files(upload_files(out))
    _print_next_steps(out, args.repo_id)


def _card_facts(args: argparse.Namespace) -> Dict[str, object]:
    """What the user states about the weights, for their card; nothing is assumed."""
    facts = dict(base_model=args.base_model, datasets=args.datasets, license=args.license,
                 weights_source=getattr(args, 'weights_source', None))
    return {k: v for k, v in facts.items() if v is not None}


def _add_card_facts(p: argparse.ArgumentParser) -> None:
    p.add_argument('--base-model', metavar='REPO|TAG',
                   help='the Hub repository (ORG/NAME) or published tag (densenet121.ra_in1k) these weights were '
                        'fine-tuned from; stated in the card (default: not stated)')
    p.add_argument('--dataset', dest='datasets', action='append', metavar='ID',
                   help='a Hub dataset id the weights were trained on (imagenet-1k, ORG/NAME); repeat for several '
                        '(default: not stated)')
    p.add_argument('--license', metavar='ID', help="the weights' license as the Hub lists it (apache-2.0, mit, "
                                                   'cc-by-4.0, other) (default: not stated)')


def _cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_folder
    folder = args.model[len('local-dir:'):] if args.model.startswith('local-dir:') else args.model
    result = push_folder(
        folder, args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr, dry_run=args.dry_run)
    target = result.repo_id + (f' (branch {result.revision})' if result.revision else '')
    print(f'{"would upload" if result.dry_run else "uploaded"} to {target}:')
    _print_files(result.files)
    if result.dry_run:
        how = {'folder': f'as it is in {folder}', 'rendered': f'rendered for {result.repo_id}; the folder is unchanged',
               'config': f'rendered for {result.repo_id} from config.json'}.get(result.card_source, result.card_source)
        print(f'README.md, the model card ({how}):')
        print('\n'.join(('  | ' + line).rstrip() for line in result.card.rstrip('\n').splitlines()))
    print('dry run: nothing was uploaded.' if result.dry_run else (result.pr_url or result.commit_url))


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict
    results = predict(args.model, args.images, pretrained=args.pretrained, weights=args.checkpoint, top_k=args.topk,
                      batch_size=args.batch_size)
    if args.json:
        print(json.dumps([dict(path=r.path, error=r.error, top=[
            dict(index=i, label=label, probability=p) for i, label, p in r.top]) for r in results], indent=2))
    else:
        for r in results:
            if r.error is None:
                print(r.path)
                for _, label, p in r.top:
                    print(f'  {100 * p:6.2f}%  {label}')
    sys.stdout.flush()
    for r in results:
        if r.error is not None:
            print(f'timm-densenet-ext predict: error: {r.error}', file=sys.stderr)
    return 2 if any(r.error for r in results) else 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import STATE_FILE, finetune
    try:
        result = finetune(
            args.model, args.data_dir, args.output, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, img_size=args.img_size, hflip=args.hflip, scale=args.scale,
            seed=args.seed, pretrained=args.pretrained, weights=args.checkpoint, resume=args.resume,
            force=args.force, repo_id=args.repo_id, threads=args.threads)
    except KeyboardInterrupt:
        state = Path(args.output) / STATE_FILE
        if state.is_file():
            print(f'\ninterrupted: {state} holds the last finished epoch; continue with the same command and '
                  f'--resume.', file=sys.stderr)
        return 130
    print(f'wrote {result.out_dir}: epoch {result.best_epoch}, validation accuracy {100 * result.val_accuracy:.2f}% '
          f'({result.val_correct}/{result.val_images}):')
    from .hub import upload_files
    _print_files(upload_files(result.out_dir))
    _print_next_steps(result.out_dir, args.repo_id)
    return 0


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import CHECK_BATCH_SIZES, export_model
    result = export_model(args.model, args.format, args.output, pretrained=args.pretrained, weights=args.checkpoint,
                          force=args.force)
    size = 'x'.join(str(s) for s in result.input_size)
    runtime = {'onnx': 'onnxruntime', 'torchscript': 'torch.jit.load', 'exported-program': 'torch.export.load'}
    print(f'wrote {result.path} ({result.format}, {result.size_bytes / 1e6:.1f} MB), input (batch, {size}) with a '
          f'dynamic batch axis; loaded with {runtime[result.format]}, it matches PyTorch to '
          f'{result.max_abs_diff:.1e} at batch sizes {" and ".join(map(str, CHECK_BATCH_SIZES))}.')


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    recipe = {'epochs': args.epochs} if args.epochs else {}
    run_demo(args.output, force=args.force, threads=args.threads, **recipe)


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from .benchmark import run_from_args
    run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog='timm-densenet-ext',
        description='DenseNet variants for timm: classify, fine-tune, export, inspect, convert, publish.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}',
                        help="print this tool's version and exit")
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func, _parser=p, _model_required=False)
        return p

    p = command('list', _cmd_list, 'table of every variant: parameters, GMACs, pretrained tags')
    _add_json(p)

    p = command('info', _cmd_info, "a variant's pretrained config, feature pyramid, parameters and GMACs")
    _add_model(p, help='variant name, optionally with a pretrained tag (densenet121.tv_in1k)')
    _add_json(p)

    p = command('predict', _cmd_predict, 'classify images: top-k class names and probabilities')
    _add_model(p, positional=False)
    p.add_argument('images', nargs='+', metavar='IMAGE',
                   help='image files (without -m/--model, the first is taken as the model: the earlier form)')
    _add_weights(p, 'classify with')
    p.add_argument('--topk', '--top-k', dest='topk', type=int, default=5, metavar='K',
                   help='classes shown per image (default 5)')
    p.add_argument('-b', '--batch-size', type=int, default=16, metavar='B', help='images per forward pass (default 16)')
    _add_json(p)

    p = command('finetune', _cmd_finetune, 'fine-tune on an image folder (DIR/train, DIR/val) and write a hub folder')
    _add_model(p, help=_MODEL_HELP + "; the classifier is reset to the data's classes", positional=False,
               required=False)
    p.add_argument('--data-dir', '--data', dest='data_dir', metavar='DIR',
                   help='holds train/ and val/, one sub-folder of images per class')
    _add_output(p, 'the hub folder to write (the best epoch)')
    _add_weights(p, 'start from')
    p.add_argument('--epochs', type=int, metavar='N', help='epochs (default 10)')
    p.add_argument('-b', '--batch-size', type=int, metavar='B', help='batch size (default 32)')
    p.add_argument('--lr', type=float, metavar='LR', help='AdamW peak learning rate, cosine schedule (default 1e-3)')
    p.add_argument('--weight-decay', type=float, metavar='WD', help='AdamW weight decay (default 0.05)')
    p.add_argument('--img-size', type=int, metavar='PX', help="train and record this input size (default: the model's)")
    p.add_argument('--hflip', type=float, metavar='P', help='horizontal flip probability (default 0.5)')
    p.add_argument('--scale', type=float, nargs=2, metavar=('MIN', 'MAX'),
                   help='random-resized crop area range (default 0.08 1.0)')
    p.add_argument('--seed', type=int, metavar='S', help='seed of the classifier, batches and augmentation (default 0)')
    p.add_argument('--repo-id', metavar='ORG/NAME', help="the Hub repository the card's usage code loads")
    p.add_argument('--resume', action='store_true', help='continue the interrupted run in --output')
    _add_threads(p)
    _add_force(p, 'replace an existing --output (kept if the run fails)')

    p = command('export', _cmd_export, 'export to ONNX, TorchScript or torch.export, checked against PyTorch')
    _add_model(p)
    p.add_argument('--format', required=True, choices=('onnx', 'torchscript', 'exported-program'),
                   help='onnx (run with onnxruntime), torchscript (torch.jit.load) or exported-program (torch.export)')
    _add_output(p, 'the file to write')
    _add_weights(p, 'export')
    _add_force(p, 'replace an existing --output file')

    p = command('demo', _cmd_demo, "offline: fine-tune DenseNet-BC on scikit-learn's digits, reload and measure it")
    _add_output(p, 'the folder where data/ and the hub folder go', required=False, default='densenet-demo')
    p.add_argument('--epochs', type=int, metavar='N', help='fewer epochs for a quick look (default: the demo recipe)')
    _add_threads(p)
    _add_force(p, 'replace data/ and the hub folder of an earlier run in --output')

    p = command('benchmark', _cmd_benchmark, "speed and memory side by side with timm's and torchvision's DenseNet")
    from .benchmark import add_arguments
    add_arguments(p)

    p = command('convert', _cmd_convert,
                'convert a checkpoint into a hub folder (model.safetensors, config.json, model card)')
    p.add_argument('checkpoint_arg', nargs='?', metavar='CHECKPOINT', help='the same as --checkpoint')
    p.add_argument('--checkpoint', '--weights', dest='checkpoint', metavar='PATH',
                   help='torchvision or timm checkpoint (.pth, .pth.tar, .bin) or .safetensors file')
    _add_model(p, help='the variant the checkpoint was trained as; a tag picks that preprocessing config',
               positional=False)
    _add_output(p, 'the hub folder to write')
    p.add_argument('--num-classes', type=int, metavar='N', help="check the classifier has N classes (default: read)")
    p.add_argument('--repo-id', metavar='ORG/NAME', help="the repository the card's usage code loads (optional: push "
                                                          'renders the card for the repository it pushes to)')
    p.add_argument('--no-ema', action='store_true', help="read a training checkpoint's 'state_dict', not its EMA")
    _add_card_facts(p)
    p.add_argument('--weights-source', metavar='TEXT',
                   help='a sentence on where the weights come from, put in the card before the conversion note')
    _add_force(p, 'replace an existing --output folder (kept if the write fails)')

    p = command('card', _cmd_card, "render a pretrained tag's model card (the README.md of its Hub repository)")
    _add_model(p, help='variant, optionally with a pretrained tag', required=False)
    p.add_argument('--all', action='store_true', help="write every published tag's card into model_cards/ (or "
                                                      '--output DIR); cards with other text are kept unless --force')
    _add_output(p, 'write the card to this file (with --all: into this folder)', required=False)
    _add_force(p, 'overwrite existing card files')
    p.add_argument('--repo-id', metavar='ORG/NAME', help="the repository the usage code loads (default: the tag's "
                                                         'own; for another the card states only the facts you pass)')
    _add_card_facts(p)

    p = command('push', _cmd_push, 'upload a hub folder to a Hugging Face Hub repository')
    _add_model(p, help='the hub folder to upload, DIR or local-dir:DIR (written by convert or finetune)')
    p.add_argument('--repo-id', required=True, metavar='ORG/NAME',
                   help="the repository (created if missing); the card's usage code, links and title are rendered "
                        'for it')
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', metavar='BRANCH', help='the branch to commit to (created if missing)')
    p.add_argument('--commit-message', metavar='M', help='the commit message')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--dry-run', action='store_true', help='validate the folder and print what would be uploaded, '
                                                          'the model card included; needs no token or network')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._naming import cli_style
    args = build_parser().parse_args(argv)
    if args.command == 'predict' and not args.model:  # the earlier form: predict MODEL IMAGE...
        if len(args.images) < 2:
            args._parser.error('give the model with -m/--model MODEL and one or more images.')
        args.model, args.images = args.images[0], args.images[1:]
    elif hasattr(args, 'model'):
        args.model = _model(args, args._parser)
    try:
        with cli_style():
            code = args.func(args) or 0
            sys.stdout.flush()  # here, where a reader that went away is handled, not at exit
            return code
    except (CliError, ValueError, OSError, ImportError) as e:
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        print(f'timm-densenet-ext {args.command}: error: {e}', file=sys.stderr)
        return 2


def _broken_pipe() -> int:
    """Output piped into `head` that stopped reading: not an error of ours; no traceback at exit either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a command that lost its reader


if __name__ == '__main__':
    sys.exit(main())
