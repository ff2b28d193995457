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
from typing import Callable, Dict, Optional, Sequence, Tuple

from ._naming import add_option as _option, cli_style, program
from .stats import list_models_table, model_info

__all__ = ['main', 'CliError', 'list_models_table', 'model_info']


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


_MODEL_HELP = ('a variant (densenet121, densenet121.tv_in1k), or a hub folder local-dir:DIR (from convert or '
               'finetune), which brings its own weights and class names')
_CARD_FACTS = ('base_model', 'datasets', 'license', 'weights_source')  # in _card_facts' order


def _add_model(p: argparse.ArgumentParser, help: str = _MODEL_HELP, positional: bool = True,
               required: bool = True) -> None:
    """-m/--model MODEL; `positional` also accepts it as the first argument, this tool's earlier form."""
    _option(p, 'model', help + ('' if required else ' (optional)'))
    if positional:
        p.add_argument('model_arg', nargs='?', metavar='MODEL', help='the same as -m/--model (the earlier form)')
    p.set_defaults(_model_required=required)


def _add_output(p: argparse.ArgumentParser, what: str, required: bool = True, default: Optional[str] = None) -> None:
    _option(p, 'output', what + ('' if default is None else f' (default {default})'), required=required,
            default=default, metavar='DIR' if 'folder' in what else 'FILE')


def _add_weights(p: argparse.ArgumentParser, what: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument('--pretrained', action='store_true', help=f"{what} the Hub's weights of the variant's tag")
    _option(group, 'checkpoint', f'{what} the weights of a checkpoint file (any format convert reads)')


def _add_card_facts(p: argparse.ArgumentParser) -> None:
    for dest in _CARD_FACTS[:3]:  # convert adds --weights-source, which a rendered card does not take
        _option(p, dest)


def _card_facts(args: argparse.Namespace) -> Dict[str, object]:
    """What the user states about the weights, for their card; nothing is assumed."""
    facts = {dest: getattr(args, dest, None) for dest in _CARD_FACTS}
    return {k: v for k, v in facts.items() if v is not None}


def _model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Optional[str]:
    """The model given either way; both, or neither when one is required, is a usage error."""
    positional = getattr(args, 'model_arg', None)
    if args.model and positional:
        parser.error(f'give the model once: -m {args.model} or {positional}, not both.')
    model = args.model or positional
    if args._model_required and not model:
        parser.error('give the model with -m/--model MODEL (a variant such as densenet121, or local-dir:DIR).')
    return model


# ---- what the subcommands print

def _print_files(files: Sequence) -> None:
    def size(n: float) -> str:
        for unit in ('B', 'kB', 'MB', 'GB'):
            if n < 1000 or unit == 'GB':
                return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
            n /= 1000
    for name, n in files:
        print(f'  {name:<24}{size(n):>10}')
    print(f'  {len(files)} files, {size(sum(n for _, n in files))}')


def _print_hub_folder(folder: Path, repo_id: Optional[str]) -> None:
    """What a hub folder's writer prints last: its files, and next steps that a user (and test_next_steps) runs
    exactly as printed."""
    from .hub import load_code, upload_files
    _print_files(upload_files(folder))
    print('next:')
    print(f'  load it in Python: {load_code(folder)}')
    push = f'{program()} push {shlex.quote(str(folder))} --repo-id {repo_id or "ORG/NAME"}'
    print(f'  check the upload: {push} --dry-run')
    print(f'  publish it: {push}')


# ---- the subcommands: the arguments each takes, and what it runs (parse, call one function, print)

def _list_arguments(p: argparse.ArgumentParser) -> None:
    _option(p, 'json')


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
        tags = ', '.join(r['pretrained_tags']) or '-'
        print(f'{r["name"]:<22}{r["params"]:>14,}{r["gmacs"]:>9.2f}  {size:<10}{tags}')


def _info_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p, help='variant name, optionally with a pretrained tag (densenet121.tv_in1k)')
    _option(p, 'json')


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


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p, positional=False)
    p.add_argument('images', nargs='+', metavar='IMAGE',
                   help='image files (without -m/--model, the first is taken as the model: the earlier form)')
    _add_weights(p, 'classify with')
    _option(p, 'topk', 'classes shown per image (default 5)', default=5)
    _option(p, 'batch_size', 'images per forward pass (default 16)', default=16)
    _option(p, 'json')
    p.add_argument('--cam', metavar='DIR', help="write each image's class activation map (Grad-CAM of its top class) "
                                                'over the image the model saw, as DIR/<image name>.png (needs the '
                                                "'explain' extra: pytorch-grad-cam)")
    p.add_argument('--cam-class', metavar='NAME', help='map this class instead of the top one (a class name as '
                                                       'printed)')
    _option(p, 'force', 'replace existing files in --cam DIR')


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict
    results = predict(args.model, args.images, pretrained=args.pretrained, weights=args.checkpoint, top_k=args.topk,
                      batch_size=args.batch_size, cam_dir=args.cam, cam_class=args.cam_class, force=args.force)
    if args.json:
        print(json.dumps([dict(path=r.path, error=r.error, top=[
            dict(index=i, label=label, probability=p) for i, label, p in r.top],
            **({} if args.cam is None else dict(cam=r.cam))) for r in results], indent=2))
    else:
        for r in results:
            if r.error is None:
                print(r.path)
                for _, label, p in r.top:
                    print(f'  {100 * p:6.2f}%  {label}')
                if r.multi_label and not r.top:
                    print('  no label at or above its threshold')
        for r in results:
            if r.cam is not None:
                print(f'wrote {r.cam}: Grad-CAM of {args.cam_class or (r.top[0][1] if r.top else "the top label")!r} '
                      f'on {r.path}')
    sys.stdout.flush()
    for r in results:
        if r.error is not None:
            print(f'timm-densenet-ext predict: error: {r.error}', file=sys.stderr)
    return 2 if any(r.error for r in results) else 0


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p, help=_MODEL_HELP + "; the classifier is reset to the data's classes", positional=False,
               required=False)
    _option(p, 'data_dir', 'holds train/ and val/, one sub-folder of images per class')
    _add_output(p, 'the hub folder to write (the best epoch)')
    _add_weights(p, 'start from')
    _option(p, 'epochs', 'epochs (default 10)')
    _option(p, 'batch_size', 'batch size (default 32); under torchrun the global batch, split between the processes')
    p.add_argument('--lr', type=float, metavar='LR', help='AdamW peak learning rate, cosine schedule (default 1e-3)')
    p.add_argument('--weight-decay', type=float, metavar='WD', help='AdamW weight decay (default 0.05)')
    _option(p, 'img_size', "train and record this input size (default: the model's)")
    p.add_argument('--hflip', type=float, metavar='P', help='horizontal flip probability (default 0.5)')
    p.add_argument('--scale', type=float, nargs=2, metavar=('MIN', 'MAX'),
                   help='random-resized crop area range (default 0.08 1.0)')
    p.add_argument('--color-jitter', type=float, metavar='F', help='colour jitter strength (default 0.4; 0: none)')
    p.add_argument('--seed', type=int, metavar='S', help='seed of the classifier, batches and augmentation (default 0)')
    _option(p, 'repo_id', "the Hub repository the card's usage code loads")
    p.add_argument('--resume', action='store_true', help='continue the interrupted run in --output (with any number '
                                                        'of processes)')
    p.add_argument('--sync-bn', action='store_true', help='under torchrun: BatchNorm with the statistics of the '
                                                          'global batch, over every process (SyncBatchNorm)')
    _option(p, 'threads')
    _option(p, 'force', 'replace an existing --output (kept if the run fails)')
    group = p.add_argument_group('multi-label (CheXNet style: several labels per image, a sigmoid per label)')
    group.add_argument('--multi-label', action='store_true',
                       help='train a sigmoid per label on --labels; the best epoch by mean validation AUROC, with a '
                            'threshold per label in config.json')
    _option(group, 'labels', "a row per image of train/ and val/: 'file,labels' with a|b, or a 0/1 column per label "
                             '(default DIR/labels.csv)')
    group.add_argument('--label-names', metavar='A,B', help="the labels and their order (default: the CSV's)")
    _option(group, 'uncertain')
    group.add_argument('--in-chans', type=int, choices=(1, 3),
                       help='input channels: 1 for grey images, the first convolution adapted from the weights')


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import STATE_FILE, finetune
    try:
        result = finetune(
            args.model, args.data_dir, args.output, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, img_size=args.img_size, hflip=args.hflip, scale=args.scale,
            seed=args.seed, pretrained=args.pretrained, weights=args.checkpoint, resume=args.resume,
            force=args.force, repo_id=args.repo_id, threads=args.threads, multi_label=args.multi_label,
            labels=args.labels, label_names=args.label_names, uncertain=args.uncertain, in_chans=args.in_chans,
            color_jitter=args.color_jitter, sync_bn=args.sync_bn)
    except KeyboardInterrupt:
        state = Path(args.output) / STATE_FILE
        if state.is_file() and _primary():
            print(f'\ninterrupted: {state} holds the last finished epoch; continue with the same command and '
                  f'--resume.', file=sys.stderr)
        return 130
    if result.rank != 0:  # torchrun's other processes: rank 0 prints
        return 0
    measured = (_auroc_summary(result.multi_label) if result.multi_label else
                f'validation accuracy {100 * result.val_accuracy:.2f}% ({result.val_correct}/{result.val_images})')
    print(f'wrote {result.out_dir}: epoch {result.best_epoch}, {measured}:')
    _print_hub_folder(result.out_dir, args.repo_id)
    return 0


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p, positional=False)
    _option(p, 'data_dir', 'the images: DIR/val/CLASS/IMAGE if DIR/val exists, else DIR/CLASS/IMAGE; class folders '
                           "are matched to the model's class names", required=True)
    _add_weights(p, 'measure')
    _option(p, 'batch_size', 'images per forward pass (default 64)', default=64)
    _option(p, 'img_size', "measure at this input size (default: the model's)")
    _add_output(p, 'a folder to write results.json and confusion.png (roc.png for a multi-label model) into',
                required=False)
    _option(p, 'force', 'replace results.json and confusion.png (roc.png) in --output')
    _option(p, 'threads')
    group = p.add_argument_group('multi-label models (a hub folder from finetune --multi-label)')
    _option(group, 'labels', "a row per image: 'file,labels' with a|b, or a 0/1 column per label; its val/ rows if "
                             'it has train/ and val/ ones (default DIR/labels.csv)')
    _option(group, 'uncertain')
    group.add_argument('--write-thresholds', action='store_true',
                       help="store the thresholds picked on these images in the hub folder's config.json (and its "
                            'card, when unedited), where predict reads them')


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate
    result = validate(args.model, args.data_dir, pretrained=args.pretrained, weights=args.checkpoint,
                      batch_size=args.batch_size, img_size=args.img_size, output=args.output, force=args.force,
                      threads=args.threads, labels=args.labels, uncertain=args.uncertain,
                      write_thresholds=args.write_thresholds)
    for line in result.unreadable:
        print(f'timm-densenet-ext validate: skipped: {line}', file=sys.stderr)
    skipped = f', {len(result.unreadable)} unreadable skipped' if result.unreadable else ''
    if result.task == 'multi-label':
        return _print_multilabel_validation(args.model, result, skipped)
    print(f'{args.model} on {result.data_dir}: {result.evaluated} of {result.images} images{skipped}, '
          f'{len(result.classes)} classes, {result.img_size} px')
    top5 = f'  top-5 {result.top5:.2f}% ({result.top5_correct}/{result.evaluated})' if result.top5 is not None else ''
    print(f'top-1 {result.top1:.2f}% ({result.correct}/{result.evaluated}){top5}  loss {result.loss:.4f}  '
          f'{result.images_per_second:.1f} images/s')
    worst = ', '.join(f'{c.name} {c.accuracy:.1f}% ({c.correct}/{c.images})' for c in result.worst(5)
                      if c.correct < c.images)
    print(f'worst classes: {worst or "none, every image right"}')
    for path in result.files:
        print(f'wrote {path}')
    return 0


def _print_multilabel_validation(model: str, result, skipped: str) -> int:
    """validate's summary of a multi-label model: the mean AUROC, then each label's AUROC and thresholds."""
    print(f'{model} on {result.data_dir}: {result.evaluated} of {result.images} images{skipped}, '
          f'{len(result.classes)} labels, {result.img_size} px')
    mean = 'undefined' if result.mean_auroc is None else f'{result.mean_auroc:.4f}'
    print(f'mean AUROC {mean}  every label right {result.correct}/{result.evaluated}  loss {result.loss:.4f}  '
          f'{result.images_per_second:.1f} images/s')
    width = max(len('label'), *(len(c.name) for c in result.per_class))
    print(f'{"label":<{width}}  {"AUROC":>7}  {"threshold":>9}  {"picked (" + result.threshold_rule + ")":>11}  '
          f'{"positives":>9}  {"precision":>9}  {"recall":>7}  {"F1":>7}')
    for c in result.per_class:
        auroc = '-' if c.auroc is None else f'{c.auroc:.4f}'
        picked = '-' if c.picked_threshold is None else f'{c.picked_threshold:.4f}'
        print(f'{c.name:<{width}}  {auroc:>7}  {c.threshold:>9.4f}  {picked:>11}  {c.positives:>9}  '
              f'{c.precision:>9.4f}  {c.recall:>7.4f}  {c.f1:>7.4f}')
    if result.auroc_note:
        print(result.auroc_note)
    from .multilabel import THRESHOLD_RULES
    print('precision, recall and F1 at each label\'s threshold (config.json\'s); picked: the threshold of '
          f'{THRESHOLD_RULES[result.threshold_rule]} on these images')
    for path in result.files:
        print(f'wrote {path}')
    return 0


def _auroc_summary(measured: Dict[str, object]) -> str:
    """A multi-label run's mean validation AUROC and each label's."""
    per_label = ', '.join(f'{n} {"-" if a is None else f"{a:.4f}"}' for n, a in measured['per_label'].items())
    return f'mean validation AUROC {measured["mean_auroc"]:.4f} ({per_label})'


def _primary() -> bool:
    """Whether this process reports: not one of torchrun's processes other than rank 0."""
    return os.environ.get('RANK', '0') == '0'


def _export_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument('--format', required=True, choices=('onnx', 'torchscript', 'exported-program'),
                   help='onnx (run with onnxruntime), torchscript (torch.jit.load) or exported-program (torch.export)')
    _add_output(p, 'the file to write')
    _add_weights(p, 'export')
    _option(p, 'precision', 'fp32 (default); bf16: the fused model in bfloat16, float32 in and out (torchscript or '
                            'exported-program); int8: ONNX Runtime static quantization, calibrated on --data-dir '
                            "train/ (onnx). bf16 and int8 are kept only if their top-1 class agrees with fp32's on "
                            '99%% or more of the images of --data-dir val/')
    _option(p, 'data_dir', 'holds train/ and val/, one sub-folder of images per class, as finetune takes: needed by '
                           'bf16 and int8; with fp32, also measures agreement on val/')
    _option(p, 'force', 'replace an existing --output file')


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import CHECK_BATCH_SIZES, export_model
    result = export_model(args.model, args.format, args.output, pretrained=args.pretrained, weights=args.checkpoint,
                          force=args.force, precision=args.precision, data_dir=args.data_dir)
    size = 'x'.join(str(s) for s in result.input_size)
    runtime = {'onnx': 'onnxruntime', 'torchscript': 'torch.jit.load', 'exported-program': 'torch.export.load'}
    batches = " and ".join(map(str, CHECK_BATCH_SIZES))
    if result.precision == 'fp32':
        print(f'wrote {result.path} ({result.format}, {result.size_bytes / 1e6:.1f} MB), input (batch, {size}) with a '
              f'dynamic batch axis; loaded with {runtime[result.format]}, it matches PyTorch to '
              f'{result.max_abs_diff:.1e} at batch sizes {batches}.')
    else:
        print(f'wrote {result.path} ({result.format}, {result.precision}, {result.size_bytes / 1e6:.1f} MB), input '
              f'(batch, {size}) with a dynamic batch axis; loaded with {runtime[result.format]}, it runs at batch '
              f'sizes {batches}.')
    if result.checked_on is not None:
        print(f'checked on {result.images_checked} images of {result.checked_on}: top-1 agrees with fp32 on '
              f'{100 * result.top1_agreement:.2f}%, largest logit difference {result.max_logit_diff:.2g}.')


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    _add_output(p, 'the folder where data/ and the hub folder go', required=False, default='densenet-demo')
    _option(p, 'epochs', 'fewer epochs for a quick look (default: the demo recipe)')
    _option(p, 'threads')
    _option(p, 'force', 'replace data/ and the hub folder of an earlier run in --output')


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    recipe = {'epochs': args.epochs} if args.epochs else {}
    run_demo(args.output, force=args.force, threads=args.threads, **recipe)


def _benchmark_arguments(p: argparse.ArgumentParser) -> None:
    from .benchmark import add_arguments
    add_arguments(p)


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from .benchmark import run_from_args
    run_from_args(args)


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('checkpoint_arg', nargs='?', metavar='CHECKPOINT', help='the same as --checkpoint')
    _option(p, 'checkpoint', 'torchvision or timm checkpoint (.pth, .pth.tar, .bin) or .safetensors file')
    _add_model(p, help='the variant the checkpoint was trained as; a tag picks that preprocessing config',
               positional=False)
    _add_output(p, 'the hub folder to write')
    p.add_argument('--num-classes', type=int, metavar='N', help="check the classifier has N classes (default: read)")
    _option(p, 'repo_id', "the repository the card's usage code loads (optional: push renders the card for the "
                          'repository it pushes to)')
    p.add_argument('--no-ema', action='store_true', help="read a training checkpoint's 'state_dict', not its EMA")
    _add_card_facts(p)
    _option(p, 'weights_source')
    _option(p, 'force', 'replace an existing --output folder (kept if the write fails)')


def _cmd_convert(args: argparse.Namespace) -> None:
    from .hub import convert_checkpoint
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
    _print_hub_folder(out, args.repo_id)


def _card_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p, help='variant, optionally with a pretrained tag', required=False)
    p.add_argument('--all', action='store_true', help="write every published tag's card into model_cards/ (or "
                                                      '--output DIR); cards with other text are kept unless --force')
    _add_output(p, 'write the card to this file (with --all: into this folder)', required=False)
    _option(p, 'force', 'overwrite existing card files')
    _option(p, 'repo_id', "the repository the usage code loads (default: the tag's own; for another the card "
                          'states only the facts you pass)')
    _add_card_facts(p)


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


def _push_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p, help='the hub folder to upload, DIR or local-dir:DIR (written by convert or finetune)')
    _option(p, 'repo_id', "the repository (created if missing); the card's usage code, links and title are "
                          'rendered for it', required=True)
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', metavar='BRANCH', help='the branch to commit to (created if missing)')
    p.add_argument('--commit-message', metavar='M', help='the commit message')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--dry-run', action='store_true', help='validate the folder and print what would be uploaded, '
                                                          'the model card included; needs no token or network')


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
        how = {'folder': f'as it is in {folder}',
               'rendered': f'rendered for {result.repo_id}; the folder is unchanged',
               'config': f'rendered for {result.repo_id} from config.json'}.get(result.card_source, result.card_source)
        print(f'README.md, the model card ({how}):')
        print('\n'.join(('  | ' + line).rstrip() for line in result.card.rstrip('\n').splitlines()))
    print('dry run: nothing was uploaded.' if result.dry_run else (result.pr_url or result.commit_url))


_Command = Tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Optional[int]], str]
_COMMANDS: Dict[str, _Command] = {  # name: (its arguments, what it runs, its help)
    'list': (_list_arguments, _cmd_list, 'table of every variant: parameters, GMACs, pretrained tags'),
    'info': (_info_arguments, _cmd_info, "a variant's pretrained config, feature pyramid, parameters and GMACs"),
    'predict': (_predict_arguments, _cmd_predict, 'classify images: top-k class names and probabilities'),
    'finetune': (_finetune_arguments, _cmd_finetune,
                 'fine-tune on an image folder (DIR/train, DIR/val) and write a hub folder'),
    'validate': (_validate_arguments, _cmd_validate,
                 'measure a model on an image folder: top-1/top-5, per-class accuracy, confusion matrix'),
    'export': (_export_arguments, _cmd_export,
               'export to ONNX, TorchScript or torch.export (fp32, bf16 or int8), checked against PyTorch'),
    'demo': (_demo_arguments, _cmd_demo,
             "offline: fine-tune DenseNet-BC on scikit-learn's digits, reload and measure it"),
    'benchmark': (_benchmark_arguments, _cmd_benchmark,
                  "speed and memory side by side with timm's and torchvision's DenseNet"),
    'convert': (_convert_arguments, _cmd_convert,
                'convert a checkpoint into a hub folder (model.safetensors, config.json, model card)'),
    'card': (_card_arguments, _cmd_card, "render a pretrained tag's model card (the README.md of its Hub repository)"),
    'push': (_push_arguments, _cmd_push, 'upload a hub folder to a Hugging Face Hub repository'),
}


def build_parser() -> argparse.ArgumentParser:
    """The tool's parser: a subparser per entry of `_COMMANDS`."""
    from . import __version__
    parser = argparse.ArgumentParser(
        prog='timm-densenet-ext',
        description='DenseNet variants for timm: classify, fine-tune, validate, export, inspect, convert, publish.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}',
                        help="print this tool's version and exit")
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (add_arguments, run, help) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=run, _parser=p, _model_required=False)
        add_arguments(p)
    return parser


def _parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The arguments, with the model taken from wherever it was given (-m/--model, or the earlier positional)."""
    args = build_parser().parse_args(argv)
    if args.command == 'predict' and not args.model:  # the earlier form: predict MODEL IMAGE...
        if len(args.images) < 2:
            args._parser.error('give the model with -m/--model MODEL and one or more images.')
        args.model, args.images = args.images[0], args.images[1:]
    elif hasattr(args, 'model'):
        args.model = _model(args, args._parser)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool on `argv` (default: the command line); the exit code."""
    args = _parse_args(argv)
    try:
        with cli_style():
            code = args.func(args) or 0
            sys.stdout.flush()  # here, where a reader that went away is handled, not at exit
            return code
    except (CliError, ValueError, OSError, ImportError) as e:
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        if _primary():  # under torchrun every process raises the error; rank 0 says it
            print(f'timm-densenet-ext {args.command}: error: {e}', file=sys.stderr)
        return 2


def _broken_pipe() -> int:
    """Output piped into `head` that stopped reading: not an error of ours; no traceback at exit either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a command that lost its reader


if __name__ == '__main__':
    sys.exit(main())
