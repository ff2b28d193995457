"""Real huggingface_hub cache layouts on disk, for loading through the real (offline) code paths."""
import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import save_file


def add_to_hub_cache(
        cache_dir: Union[str, Path],
        repo_id: str,
        files: Dict[str, Union[bytes, str, Path]],
        revision: str = 'main',
) -> Path:
    """Place `files` (name -> bytes, text, or a file to copy) in the cache as `repo_id`'s snapshot at `revision`.

    Layout, as huggingface_hub writes it: models--ORG--NAME/{blobs/SHA, refs/REVISION, snapshots/COMMIT/FILE}.
    Returns the snapshot folder.
    """
    repo_dir = Path(cache_dir) / ('models--' + repo_id.replace('/', '--'))
    commit = hashlib.sha1(f'{repo_id}@{revision}'.encode()).hexdigest()
    snapshot = repo_dir / 'snapshots' / commit
    (repo_dir / 'blobs').mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs').mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, Path):
            data = content.read_bytes()
        elif isinstance(content, str):
            data = content.encode()
        else:
            data = content
        blob = repo_dir / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(Path('..') / '..' / 'blobs' / blob.name if '/' not in name else blob.resolve())
        except OSError:
            shutil.copyfile(blob, target)
    (repo_dir / 'refs' / revision).write_text(commit)
    return snapshot


def add_weights_to_hub_cache(
        cache_dir: Union[str, Path],
        repo_id: str,
        state_dict: Dict[str, torch.Tensor],
        config: Optional[dict] = None,
) -> Path:
    """Cache `state_dict` as `repo_id`'s model.safetensors (and config.json when given)."""
    tmp = Path(cache_dir) / '.staging.safetensors'
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    files = {'model.safetensors': tmp.read_bytes()}
    tmp.unlink()
    if config is not None:
        files['config.json'] = json.dumps(config, indent=2)
    return add_to_hub_cache(cache_dir, repo_id, files)
