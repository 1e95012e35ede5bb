"""The errors a user can cause: one ``UsamError`` base, which the CLI turns into one line on stderr.

Each also derives from the builtin it refines (``ValueError``, ``OSError``), so callers that catch those keep
working.
"""

from __future__ import annotations

__all__ = [
    "CacheDamagedError", "CacheMismatchError", "ChecksumError", "DownloadError", "InputError", "OutputError", "PackageError", "SettingError",
    "UntrustedPackageError", "UsageError", "UsamError",
]


class UsamError(Exception):
    """Base of every error this package raises for bad input, files or packages."""


class UsageError(UsamError, ValueError):
    """Options that do not go together (the CLI exits with 2, as for argparse's usage errors)."""


class PackageError(UsamError, ValueError):
    """A package or family cannot be used: missing, corrupt, of another kind, or mismatched."""


class UntrustedPackageError(PackageError):
    """A package asks for something we never do for a package: run code outside ``usam_bioimageio.modeling``,
    read a file outside itself, or unpack beyond the size limits."""


class SettingError(UsamError, ValueError):
    """An environment variable (``usam_bioimageio.settings``) holds a value that cannot be used."""


class InputError(UsamError, ValueError):
    """An input file (image, prompt file, embeddings, cache) cannot be used: missing, unreadable, malformed, too
    large, or made for other data."""


class OutputError(UsamError, ValueError):
    """An output cannot be written where it was asked for: an input, an existing file (without --overwrite), a
    folder, an unwritable place or a format that cannot hold the result."""


class CacheMismatchError(UsamError, ValueError):
    """An embedding cache was written for other data, another encoder or other settings."""


class CacheDamagedError(InputError):
    """An item of an embedding cache flagged complete cannot be read back as written: a chunk deleted, truncated
    or changed after it was written (recompute the cache)."""


class DownloadError(UsamError, OSError):
    """A download failed: HTTP error, unreachable host, timeout or a truncated transfer."""


class ChecksumError(UsamError, ValueError):
    """A file's hash is not the expected one."""
