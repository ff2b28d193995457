"""Test session setup: never touch the network, never read the user's caches."""
import os
import tempfile

# Set before anything imports huggingface_hub or torch.hub, which read these at import time.
_SESSION_HOME = tempfile.mkdtemp(prefix='timm-densenet-ext-tests-')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_HOME'] = os.path.join(_SESSION_HOME, 'hf')
os.environ['HF_HUB_CACHE'] = os.path.join(_SESSION_HOME, 'hf', 'hub')
os.environ['TORCH_HOME'] = os.path.join(_SESSION_HOME, 'torch')
os.environ.pop('HF_TOKEN', None)
os.environ['HF_HUB_DISABLE_TELEMETRY'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache folder that hf_hub_download (offline) reads from for this test."""
    from huggingface_hub import constants
    cache = tmp_path / 'hub-cache'
    cache.mkdir()
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return cache
