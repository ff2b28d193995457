"""The benchmark's chart: speed and peak memory per implementation, one row of bars per mode."""
from typing import Any, Dict

__all__ = ['write_chart']


def write_chart(result: Dict[str, Any], path: str) -> None:
    """A PNG at `path`: images/s per implementation and mode, and peak memory where measured."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = result['results']
    modes = [m for m in ('inference', 'train') if any(r['mode'] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.2 * len(modes) + 0.8), squeeze=False)
    for i, mode in enumerate(modes):
        sel = [r for r in rows if r['mode'] == mode]
        names = [r['name'] for r in sel]
        colors = ['tab:orange' if n.startswith('ours') else 'tab:gray' for n in names]
        ax = axes[i][0]
        ax.barh(names, [r['images_per_s'] for r in sel], color=colors)
        ax.set_xlabel('images/s (higher is better)')
        ax.set_title(f'{mode}: speed')
        ax.invert_yaxis()
        ax = axes[i][1]
        mem = [r['peak_memory_mib'] or 0 for r in sel]
        ax.barh(names, mem, color=colors)
        ax.set_xlabel('peak memory, MiB (lower is better)')
        ax.set_title(f'{mode}: memory')
        ax.invert_yaxis()
    cfg = result['config']
    fig.suptitle(f"{cfg['model']}, batch {cfg['batch_size']}, {cfg['img_size']} px, {cfg['dtype']}, "
                 f"{result['machine']['device']}")
    fig.tight_layout()
    fig.savefig(path, format='png', dpi=100)
    plt.close(fig)
