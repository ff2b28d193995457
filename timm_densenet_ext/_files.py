"""Moving a finished temporary file to its name without ever overwriting what is there (unless asked)."""
import os
from pathlib import Path
from typing import Union


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
