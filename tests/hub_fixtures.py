"""Real huggingface_hub cache layouts on disk, for loading through the real (offline) code paths, and a Hub on
127.0.0.1 for pushing through the real HfApi."""
import base64
import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Dict, List, Optional, Union

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


class FakeHub:
    """A Hugging Face Hub on 127.0.0.1: enough of the HTTP API for the real `HfApi.create_repo`, `create_branch` and
    `create_commit` (README metadata check, preupload, commit) to run against it, as `push_folder` calls them.

    It keeps the repositories, branches and committed files, and records every request (`requests`: method, path,
    route, headers, JSON body); a request to a route it does not know is answered 404 and recorded as 'unknown', so
    a call the real client makes that this fake does not expect shows up. `fail` maps a route ('create_repo',
    'create_branch', 'validate_yaml', 'preupload', 'commit') to the HTTP status to answer instead, as the Hub does:
    an error message in the X-Error-Message header and the JSON body.
    """
    ROUTES = [
        ('POST', re.compile(r'/api/repos/create'), 'create_repo'),
        ('POST', re.compile(r'/api/validate-yaml'), 'validate_yaml'),
        ('POST', re.compile(r'/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/?]+)'), 'create_branch'),
        ('POST', re.compile(r'/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/?]+)'), 'preupload'),
        ('POST', re.compile(r'/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/?]+)'), 'commit'),
    ]
    MESSAGES = {401: 'Invalid credentials in Authorization header', 403: 'You don\'t have the rights to create a model '
                'under this namespace', 404: 'Repository not found', 500: 'Internal Error',
                503: 'Service Unavailable'}

    def __init__(self) -> None:
        self.repos: Dict[str, dict] = {}  # repo_id -> dict(private=bool, branches={name: {path: bytes}}, prs=[...])
        self.requests: List[tuple] = []
        self.commits: List[dict] = []
        self.fail: Dict[str, int] = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    hub._handle(self)
                except Exception as e:  # a bug of this fake: answered as the Hub's 500, and recorded
                    hub.requests.append((self.command, self.path, 'fake-hub-error', {}, repr(e)))
                    hub._error(self, 500, f'fake Hub error: {e!r}')

            do_POST = do_PUT = do_GET

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.endpoint = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def routes(self) -> List[str]:
        return [r[2] for r in self.requests]

    def _handle(self, req) -> None:
        path, _, query = req.path.partition('?')
        length = int(req.headers.get('Content-Length') or 0)
        body = req.rfile.read(length) if length else b''
        route, match = 'unknown', None
        for method, pattern, name in self.ROUTES:
            m = pattern.fullmatch(path)
            if m and method == req.command:
                route, match = name, m
                break
        is_json = (req.headers.get('Content-Type') or '').split(';')[0] == 'application/json'
        data = json.loads(body) if body and is_json else None
        self.requests.append((req.command, path, route, dict(req.headers), data))
        if route == 'validate_yaml' and self.fail.get(route) == 400:  # the Hub lists what is wrong in the metadata
            return self._json(req, 400, {'errors': [{'message': '"license" must be one of [apache-2.0, mit, ...]'}],
                                         'warnings': []})
        if route in self.fail:
            return self._error(req, self.fail[route], self.MESSAGES.get(self.fail[route], 'Error'))
        if route == 'unknown':
            return self._error(req, 404, f'{req.command} {path}: no such route in this fake Hub')
        repo = urllib.parse.unquote(match.group('repo')) if 'repo' in match.groupdict() else None
        rev = urllib.parse.unquote(match.group('rev')) if 'rev' in match.groupdict() else None
        if route == 'create_repo':
            repo_id = f'{data["organization"]}/{data["name"]}'
            url = f'{self.endpoint}/{repo_id}'
            if repo_id in self.repos:
                return self._json(req, 409, {'error': 'You already created this model repo', 'url': url})
            self.repos[repo_id] = dict(private=data.get('visibility') == 'private', branches={'main': {}}, prs=[])
            return self._json(req, 200, {'url': url, 'name': repo_id})
        if route == 'validate_yaml':
            return self._json(req, 200, {'errors': [], 'warnings': []})
        if repo not in self.repos:
            return self._error(req, 404, 'Repository not found', code='RepoNotFound')
        branches = self.repos[repo]['branches']
        if route == 'create_branch':
            if rev in branches:
                return self._json(req, 409, {'error': 'Reference already exists'})
            branches[rev] = dict(branches['main'])
            return self._json(req, 200, {})
        if rev not in branches:
            return self._error(req, 404, f'Invalid rev id: {rev}', code='RevisionNotFound')
        if route == 'preupload':
            return self._json(req, 200, {'files': [
                dict(path=f['path'], uploadMode='regular', shouldIgnore=False, oid=None) for f in data['files']]})
        # commit: ndjson, a header line then one line per file
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line['value'] for line in lines if line['key'] == 'header')
        files = {line['value']['path']: base64.b64decode(line['value']['content'])
                 for line in lines if line['key'] == 'file'}
        create_pr = 'create_pr=1' in query
        oid = hashlib.sha1(repr((repo, rev, len(self.commits))).encode()).hexdigest()
        self.commits.append(dict(repo_id=repo, revision=rev, create_pr=create_pr, summary=header['summary'],
                                 files=files, token=req.headers.get('Authorization')))
        if not create_pr:
            branches[rev].update(files)
        pr_url = f'{self.endpoint}/{repo}/discussions/{len(self.commits)}' if create_pr else None
        return self._json(req, 200, {'commitUrl': f'{self.endpoint}/{repo}/commit/{oid}', 'commitOid': oid,
                                     'pullRequestUrl': pr_url})

    @staticmethod
    def _json(req, status: int, payload: dict, headers: Optional[Dict[str, str]] = None) -> None:
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header('Content-Type', 'application/json')
        req.send_header('Content-Length', str(len(data)))
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(data)

    def _error(self, req, status: int, message: str, code: Optional[str] = None) -> None:
        headers = {'X-Error-Message': message, **({'X-Error-Code': code} if code else {})}
        self._json(req, status, {'error': message}, headers)


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
