"""The benchmark's Markdown table (the README shows one)."""
from typing import Any, Dict, Optional

__all__ = ['format_table']


def _fmt(v: Optional[float], spec: str, suffix: str = '') -> str:
    return '-' if v is None else format(v, spec) + suffix


def format_table(result: Dict[str, Any]) -> str:
    """A Markdown table of the results, under a line saying what was measured where."""
    cfg, mach = result['config'], result['machine']
    lines = [
        f"{cfg['model']}, batch {cfg['batch_size']}, {cfg['img_size']} px, {cfg['dtype']}, {cfg['device']}: "
        f"{mach['device']}, {mach['torch_threads']} threads; torch {mach['torch']}, timm {mach['timm']}; "
        f"median of {cfg['repeats']} interleaved rounds; 3x3-conv peak {result['conv_peak_gflops']:.0f} GFLOP/s",
        '',
        '| mode | implementation | images/s | vs timm | first output (s) | peak memory (MiB) | memory vs timm '
        '| efficiency | max rel. diff vs timm |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in result['results']:
        lines.append(
            f"| {r['mode']} | {r['name']} | {r['images_per_s']:.1f} | {_fmt(r['speedup_vs_timm'], '.2f', 'x')} "
            f"| {_fmt(r.get('first_output_s'), '.1f')} | {_fmt(r['peak_memory_mib'], '.0f')} "
            f"| {_fmt(r['memory_vs_timm'], '.2f', 'x')} "
            f"| {r['efficiency'] * 100:.0f}% | {_fmt(r.get('max_rel_diff_vs_timm'), '.1e')} |")
    return '\n'.join(lines)
