"""Fail early, in one readable sentence, when the ``mmseg`` extra is missing or mismatched."""

from __future__ import annotations

from segreward.errors import SegrewardError

INSTALL = "pip install 'segreward[mmseg]'"
UPSTREAM_FIX = ("pip uninstall -y mmsegmentation mmcv mmcv-full mmcv-lite mmengine && " + INSTALL)


class MMSegNotInstalledError(SegrewardError, ImportError):
    """The MMSegmentation plug-in cannot be used: mmseg/mmcv/mmengine are missing or broken.

    It is an ``ImportError`` (so ``allow_failed_imports`` and ``pytest.importorskip`` treat it
    as a missing module) and a ``SegrewardError`` (so the CLI prints it as one line).
    """


def require_mmseg() -> None:
    """Import mmengine, mmcv and mmseg, or raise :class:`MMSegNotInstalledError` saying what to do."""
    for module, dist in (("mmengine", "onedl-mmengine"), ("mmcv", "onedl-mmcv"), ("mmseg", "onedl-mmsegmentation")):
        try:
            __import__(module)
        except ModuleNotFoundError as exc:
            if exc.name != module and not (exc.name or "").startswith(module + "."):
                # mmseg is there but one of *its* imports is not: most often an upstream
                # mmsegmentation 1.2.x, which imports packages newer releases dropped.
                raise MMSegNotInstalledError(
                    f"importing {module} failed: module {exc.name!r} is missing. The maintained forks "
                    f"(onedl-*) do not need it; if you have upstream mmsegmentation/mmcv installed, "
                    f"replace them: {UPSTREAM_FIX}") from exc
            raise MMSegNotInstalledError(
                f"segreward.mmseg needs {module} (package {dist}), which is not installed; "
                f"install the extra: {INSTALL}") from None
        except (ImportError, AssertionError) as exc:
            # Upstream mmseg 1.2.x asserts mmcv < 2.2.0 at import, and mmcv 2.x wheels built
            # for another torch fail to load their compiled ops.
            raise MMSegNotInstalledError(
                f"importing {module} failed ({type(exc).__name__}: {exc}). segreward.mmseg is tested "
                f"with the maintained forks onedl-mmengine/onedl-mmcv/onedl-mmsegmentation; "
                f"replace upstream packages with: {UPSTREAM_FIX}") from exc
