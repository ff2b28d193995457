"""Safe writes: a claim on an output path for the whole time it is being made, and a finished temporary file moved
to its name without ever overwriting what is there (unless asked).

Two processes told to write the same output must not both report success: the first to `claim` the path writes it,
the other is refused with a one-line FileExistsError naming the path and the process holding it.
"""
import contextlib
import functools
import inspect
import os
from pathlib import Path
from typing import Callable, Iterator, Set, TypeVar, Union

__all__ = ['claim', 'claims_output', 'move_into_place', 'default_mode']

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
