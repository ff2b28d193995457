"""Safe writes: a claim on an output path for the whole time it is being made, and a finished temporary file (or
folder) moved to its name without ever overwriting what is there (unless asked).

Every workflow writes its outputs through `writing` (a file) or `writing_folder` (a folder): the output is made under
a unique hidden name beside its destination, given the permissions of a new file, and renamed into place only once it
is complete, so a failed or interrupted write leaves the destination as it was and no temporary behind.

Two processes told to write the same output must not both report success: the first to `claim` the path writes it,
the other is refused with a one-line FileExistsError naming the path and the process holding it.
"""
import contextlib
import functools
import inspect
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Set, TypeVar, Union

__all__ = ['claim', 'claims_output', 'writing', 'writing_folder', 'move_into_place', 'default_mode']

F = TypeVar('F', bound=Callable)

# paths this process holds a claim on: a workflow may call another that claims the same output (finetune writes its
# hub folder through write_hub_folder), and a claim held by this process is its own to use
_HELD: Set[str] = set()


def _lock_path(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.with_name(f'.{path.name}.lock')


def _holder(lock: Path) -> int:
    """The process id written in a lock file, or 0 if it cannot be read."""
    try:
        return int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def claim(path: Union[str, Path]) -> Iterator[None]:
    """Hold `path` for this process while it is written: a lock file `.NAME.lock` beside it, created exclusively.

    Raises FileExistsError naming the path and the holder when another live process holds it. A lock left by a
    process that has ended is taken over. Claims nest: a path this process already holds is simply used.
    """
    lock = _lock_path(Path(path))
    key = str(lock)
    if key in _HELD:
        yield
        return
    if not lock.parent.is_dir():
        raise FileNotFoundError(f'{lock.parent}: no such folder; create it, or choose another output.')
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _holder(lock)
            if _alive(pid):
                raise FileExistsError(
                    f'{path}: another process (pid {pid}) is writing it now; wait for it to finish, or choose '
                    f'another output.') from None
            with contextlib.suppress(FileNotFoundError):  # its writer is gone: take the claim over
                os.unlink(lock)
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(str(os.getpid()))
        break
    else:
        raise FileExistsError(f'{path}: another process is writing it now; wait for it, or choose another output.')
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def claims_output(param: str) -> Callable[[F], F]:
    """Decorate a workflow so that it holds a `claim` on its output argument `param` for the whole call (the folder
    it lives in is created first, as the workflow would)."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            path = Path(signature.bind(*args, **kwargs).arguments[param])
            path.absolute().parent.mkdir(parents=True, exist_ok=True)
            with claim(path):
                return fn(*args, **kwargs)
        return call  # type: ignore[return-value]
    return decorate


def default_mode() -> int:
    """The permissions of a new file under the current umask (mkstemp and safetensors write 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def move_into_place(tmp: Union[str, Path], dest: Path, force: bool, exists_message: str) -> None:
    """Rename `tmp` to `dest`; unless `force`, raise FileExistsError(exists_message) if `dest` exists."""
    if force:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # fails if `dest` exists, even one created since we looked
    except FileExistsError:
        raise FileExistsError(exists_message) from None
    except OSError:  # a filesystem without hard links
        if dest.exists():
            raise FileExistsError(exists_message) from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


def _temporary_name(path: Path) -> Path:
    """A unique hidden name beside `path`, keeping its suffix (torch.export.load reads only *.pt2 files)."""
    return path.with_name(f'.{path.stem.lstrip(".")}.{secrets.token_hex(4)}.tmp{path.suffix}')


@contextlib.contextmanager
def writing(path: Union[str, Path], *, force: bool = False, exists_message: Optional[str] = None) -> Iterator[Path]:
    """A temporary path beside `path` to write the file into; when the block ends, the file gets the permissions of
    a new file (mkstemp, safetensors and torch.save may write 0600) and is moved to `path`.

    An existing `path` is replaced only with `force`; else FileExistsError(`exists_message`), checked at the rename,
    so a file created meanwhile is not lost either. The temporary file is removed whatever happens.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        move_into_place(tmp, path, force, exists_message or f'{path}: exists; not replaced.')
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def writing_folder(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary folder beside `path` to write the folder's files into; when the block ends, its files get the
    permissions of new files and it replaces `path`, which is kept (renamed aside) until the new one is in place.

    The caller decides whether an existing `path` may be replaced (and should hold a `claim` on it meanwhile). The
    temporary folder is removed on error.
    """
    path = Path(path)
    staging = path.with_name(f'.{path.name}.{secrets.token_hex(4)}.tmp')
    staging.mkdir()
    try:
        yield staging
        mode = default_mode()
        for file in staging.iterdir():
            os.chmod(file, mode)
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, path: Path) -> None:
    """Rename the finished `staging` folder to `path`; an existing `path` is kept until that succeeded."""
    if not path.exists():
        os.rename(staging, path)
        return
    backup = path.with_name(f'.{path.name}.{secrets.token_hex(4)}.old')
    os.rename(path, backup)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)
