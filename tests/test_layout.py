"""The package's shape: imports go one way (workflows -> checkpoints -> models), with no cycle, counting the imports
made inside functions too."""
import ast
import sys
from pathlib import Path
from typing import Dict, Set

import timm_densenet_ext

PACKAGE = Path(timm_densenet_ext.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path) -> Set[str]:
    """The package modules `path` imports, wherever in the file the import statement is."""
    name = _module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            targets = [base] + [f'{base}.{a.name}' for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.startswith('timm_densenet_ext'))
    return found


def _graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in files.items():
        # `from . import x` names a module; `from .m import f` names m (f is not a module)
        graph[name] = {t for t in _imports(path) if t in files and t != name}
    return graph


def test_model_layer_imports_nothing_above_it():
    graph = _graph()
    models = {m for m in graph if m.startswith('timm_densenet_ext.models')}
    assert len(models) >= 5, sorted(graph)
    for module in sorted(models):
        above = sorted(t for t in graph[module] if t not in models)
        assert not above, f'{module} imports {above}, above the model layer'


def test_checkpoints_import_only_the_model_layer_and_leaf_helpers():
    graph = _graph()
    allowed = {'timm_densenet_ext._naming'}
    assert all(t.startswith('timm_densenet_ext.models') or t in allowed
               for t in graph['timm_densenet_ext.checkpoints']), graph['timm_densenet_ext.checkpoints']


def test_no_import_cycle():
    graph = _graph()
    # the package's __init__ re-exports from below and lazily from every workflow: leave it out, as Python does
    # (importing a submodule runs __init__ first, which imports nothing above that submodule)
    graph = {m: {t for t in ts if t != 'timm_densenet_ext'} for m, ts in graph.items()}
    state: Dict[str, int] = {}

    def visit(module: str, path: list) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError('import cycle: ' + ' -> '.join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    graph = {'timm_densenet_ext.a': {'timm_densenet_ext.b'}, 'timm_densenet_ext.b': {'timm_densenet_ext.a'}}
    monkeypatch.setattr(sys.modules[__name__], '_graph', lambda: graph)
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert 'timm_densenet_ext.a -> timm_densenet_ext.b -> timm_densenet_ext.a' in str(e)
    else:
        raise AssertionError('a cycle went unnoticed')


def test_every_public_name_and_the_earlier_module_paths_still_work():
    import importlib
    for name in timm_densenet_ext.__all__:
        assert getattr(timm_densenet_ext, name) is not None, name
    from timm_densenet_ext.models import detection, fused
    from timm_densenet_ext.models import densenet
    from timm_densenet_ext import checkpoints, models
    earlier = {  # module path of release 0.1.0 -> (a name it had, where that name lives now)
        'densenet': ('DenseNet', densenet), 'variants': ('resolve_model_name', models),
        'weights': ('read_checkpoint', checkpoints), 'fused': ('fuse_for_inference', fused),
        'detection': ('fpn_backbone', detection),
    }
    for old, (name, new) in earlier.items():
        module = importlib.import_module(f'timm_densenet_ext.{old}')
        assert getattr(module, name) is getattr(new, name), old
    from timm_densenet_ext.weights import checkpoint_filter_fn
    from timm_densenet_ext.variants import CIFAR100_MEAN, default_cfgs
    assert checkpoint_filter_fn is densenet.checkpoint_filter_fn and default_cfgs is densenet.default_cfgs
    assert CIFAR100_MEAN == (0.5071, 0.4865, 0.4409)
