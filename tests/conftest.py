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
# One CPU thread, here and in the processes tests start, unless OMP_NUM_THREADS says otherwise. With two threads on two
# cores, every operator waits for the thread that shares its core with anything else running: while another process
# kept one core busy, a DenseNet-121 forward of a 64 px batch took 2.7 s with two threads and 0.04 s with one. The
# tests' models and inputs are small: their time goes mostly to per-operator overhead, not to arithmetic.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    torch.set_num_threads(max(1, int(os.environ['OMP_NUM_THREADS'])))
except ValueError:  # a per-level list such as '2,1'
    torch.set_num_threads(1)


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


@pytest.fixture(scope='session')
def digits_demo(tmp_path_factory):
    """The demo's recipe, whole (three epochs, about 40 s on one thread): a DenseNet-BC fine-tuned on real images
    (scikit-learn's handwritten digits), for tests that measure accuracy. Returns the `demo.DemoResult`: data_dir
    (train/ and val/) and model_dir (the hub folder, loaded with 'local-dir:')."""
    from timm_densenet_ext.demo import run_demo
    return run_demo(tmp_path_factory.mktemp('digits') / 'demo', progress=False, log=lambda line: None, threads=1)
