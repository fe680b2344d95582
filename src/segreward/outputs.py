"""Output paths checked before anything is written, and written atomically.

Every command that writes a file or a folder goes through these helpers, so a bad output path
ends in one line that names it (never a traceback), an output never lands on an input, and an
interrupted write never leaves half a file behind.

    out = check_output_file(args.summary, "--summary", inputs=[args.log], overwrite=True)
    atomic_write_text(out, text)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from segreward.errors import SegrewardError


def _first_existing(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (``path`` itself if it exists)."""
    p = path
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link: treat as existing, creating under it fails
            return p
        p = p.parent
    return p


def _umask_mode(target: Path) -> int:
    """Mode for a new file: the replaced file's, else what ``open()`` would give (0666 & ~umask)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _make_dir(p: Path) -> str | None:
    """Create folder ``p`` with parents; None on success, else why not (a phrase)."""
    blocker = _first_existing(p)
    if blocker.exists() and not blocker.is_dir():
        if blocker == p:
            return "is a file, not a folder"
        return f"is under {blocker}, which is a file"
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be created ({_reason(e)})"
    if blocker != p:  # the top-most folder this call created: removed again if the command fails
        _CREATED.append(blocker / p.relative_to(blocker).parts[0])
    try:  # os.access lies for root and on read-only mounts: try it
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"is not writable ({_reason(e)})"
    return None


# Folders created by _make_dir in this process, in order (see discard_empty_dirs).
_CREATED: list[Path] = []


def created_mark() -> int:
    """A mark for :func:`discard_empty_dirs`: the folders created from now on."""
    return len(_CREATED)


def discard_empty_dirs(since: int = 0) -> None:
    """After a failure: remove the folders created since ``since`` that hold no file (their
    empty sub-folders first), so a failed command leaves no empty --out or run folder behind.
    Folders holding any file are kept."""
    for top in reversed(_CREATED[since:]):
        if not top.is_dir() or top.is_symlink():
            continue
        for sub, _, files in sorted(os.walk(top), key=lambda w: -len(Path(w[0]).parts)):
            if files == [OWNER_FILE]:  # a claimed folder that got nothing else
                os.unlink(Path(sub) / OWNER_FILE)
            try:
                os.rmdir(sub)  # fails, and is left, when it is not empty
            except OSError:
                pass
    del _CREATED[since:]


# Marks a folder a command filled itself (``claim_dir``): it may fill it again.
OWNER_FILE = ".segreward-owner"


def claim_dir(path, what: str, owner: str) -> Path:
    """:func:`ensure_dir` for a command that writes many files of its own into a folder (the demo):
    the folder must be new, empty, or one this ``owner`` filled before (its :data:`OWNER_FILE`),
    so a user's own files are never overwritten. A one-line error lists a few of them."""
    p = Path(path).expanduser()
    if p.is_dir():
        entries = sorted(e.name for e in p.iterdir())
        mark = p / OWNER_FILE
        theirs = mark.is_file() and mark.read_text(errors="replace").strip() == owner
        if entries and not theirs:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise SegrewardError(f"{what} {p}: holds files that `segreward {owner}` did not write ({shown}); "
                                 "choose a new or empty folder")
    p = ensure_dir(p, what)
    atomic_write_text(p / OWNER_FILE, owner + "\n")
    return p


def ensure_dir(path, what: str) -> Path:
    """Create directory ``path`` (with parents) and return it; a one-line :class:`SegrewardError`
    naming ``what`` and the path if it cannot be created or written into (an existing file where
    a folder is needed, a folder under a regular file, a read-only place)."""
    p = Path(path).expanduser()
    why = _make_dir(p)
    if why:
        raise SegrewardError(f"{what} {p}: folder {why}; choose another path")
    return p


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (following links; False if either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path, what: str, *, inputs=(), overwrite: bool = True) -> Path:
    """Validate an output file path before anything is written and return it as a ``Path``.

    Refuses (one-line :class:`SegrewardError` naming ``what`` and the path) when the path is the
    same file as one of ``inputs`` (never write onto an input), is an existing folder, exists and
    ``overwrite`` is False, or its parent folder cannot be created or written. Creates the parent
    folder."""
    p = Path(path).expanduser()
    for src in inputs:
        if src is not None and (same_file(p, src) or Path(src).expanduser().resolve() == p.resolve()):
            raise SegrewardError(f"{what} {p}: is also an input; refusing to write onto it, choose another file")
    if p.is_dir():
        raise SegrewardError(f"{what} {p}: is a folder; give a file name")
    if p.exists() and not overwrite:
        raise SegrewardError(f"{what} {p}: already exists; pass --overwrite to replace it, or choose another file")
    why = _make_dir(p.parent)
    if why:
        raise SegrewardError(f"{what} {p}: its folder {p.parent} {why}; "
                             "choose another path")
    if p.exists() and not os.access(p, os.W_OK):
        raise SegrewardError(f"{what} {p}: file is not writable (permission denied)")
    return p


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``,
    so readers see the old file or the new one, never half of one."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_save(path, write)


def atomic_write_text(path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path, save) -> None:
    """Atomic write for writers that take a path (``plt.savefig``, ``torch.save``,
    ``safetensors.save_file``): ``save(tmp_path)`` writes a temporary file in the same folder
    that then replaces ``path``."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=p.suffix or ".tmp")
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, _umask_mode(p))
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
