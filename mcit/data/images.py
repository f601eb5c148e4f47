"""Safe image access: every image the project opens goes through here.

Annotation files come from third parties, so an image path is untrusted input: it may climb out of the data folder
(`../../etc/...`, an absolute path, a symlink) or point at a decompression bomb (a few KB of PNG that decodes to
gigapixels). Both are refused with a DataError that names the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mcit.errors import DataError

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image (width x height) we decode. The benchmarks' biggest images are a few MP; 64 MP leaves headroom."""

_max_pixels = DEFAULT_MAX_PIXELS
Image.MAX_IMAGE_PIXELS = _max_pixels


def set_max_pixels(max_pixels: int) -> None:
    """Change the default pixel bound for this process (also PIL's own MAX_IMAGE_PIXELS, which guards any
    other code path that calls PIL directly)."""
    global _max_pixels
    if max_pixels <= 0:
        raise DataError(f"max_pixels must be positive, got {max_pixels}")
    _max_pixels = int(max_pixels)
    Image.MAX_IMAGE_PIXELS = _max_pixels


def resolve_within(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Absolute, symlink-free path of `path` (relative paths are taken from `root`), refusing anything outside
    `root`. Resolution happens before the check so `..` and symlinks cannot smuggle a path out."""
    root_real = Path(os.path.realpath(root))
    target = Path(path)
    if not target.is_absolute():
        target = root_real / target
    real = Path(os.path.realpath(target))
    if real != root_real and root_real not in real.parents:
        raise DataError(
            f"{path}: image path escapes the image root {root_real} (resolves to {real}); "
            "annotation image paths must stay inside the image root"
        )
    return real


def probe_image(path: str | os.PathLike, root: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """Check that an image is inside `root`, readable and not a bomb, reading only its header; returns (w, h).

    Validation uses this instead of `open_image` because decoding every image of a benchmark is slow.
    """
    real = resolve_within(path, root)
    with _opened(real, max_pixels) as image:
        return image.size


def open_image(path: str | os.PathLike, root: str | os.PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Open an image as RGB, refusing paths outside `root`, images above `max_pixels` and unreadable files."""
    return decode_image(resolve_within(path, root), max_pixels=max_pixels)


def decode_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Decode an image as RGB, refusing images above `max_pixels` and unreadable files. For paths already confined
    to their root (a Sample's image: `DataCard.load_task` checks it); otherwise use `open_image`."""
    with _opened(Path(path), max_pixels) as image:
        try:
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
            raise DataError(f"{path}: cannot decode image ({exc})") from exc


class _opened:
    """Context manager: PIL image opened lazily (header only) with the pixel bound enforced.

    PIL signals bombs with a warning (above MAX_IMAGE_PIXELS) or an error (above twice that); we turn both into
    DataError and also compare the header size ourselves, so a caller that set PIL's limit to None stays safe.
    """

    def __init__(self, path: Path, max_pixels: int | None) -> None:
        self.path = path
        self.max_pixels = _max_pixels if max_pixels is None else int(max_pixels)
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        if not self.path.is_file():
            raise DataError(f"{self.path}: image file not found")
        previous = Image.MAX_IMAGE_PIXELS
        try:
            # A per-call bound above the process default must not be vetoed by PIL's global check.
            Image.MAX_IMAGE_PIXELS = self.max_pixels
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.image = Image.open(self.path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise DataError(f"{self.path}: refused as a decompression bomb ({exc})") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{self.path}: unreadable image ({exc})") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous
        width, height = self.image.size
        if width * height > self.max_pixels:
            self.image.close()
            raise DataError(
                f"{self.path}: refused as a decompression bomb: {width}x{height} = {width * height} pixels "
                f"exceeds the limit of {self.max_pixels} (raise it with set_max_pixels if the image is genuine)"
            )
        return self.image

    def __exit__(self, *exc_info: object) -> None:
        if self.image is not None:
            self.image.close()
