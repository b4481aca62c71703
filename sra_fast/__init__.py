"""sra-fast: fast, exact training of SiT/DiT with Self-Representation Alignment (SRA)."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _KernelsFolderFinder(importlib.abc.MetaPathFinder):
    """Maps the repository's top-level `kernels/` folder to `sra_fast.kernels`.

    An installed package (wheel or editable) carries `sra_fast.kernels` through setup.py's
    package_dir; this finder is only consulted after the normal ones fail, i.e. when the
    source checkout is used in place (PYTHONPATH=.). `kernels` itself is never importable as
    a top-level name: it would collide with an unrelated PyPI package.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sra_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)])


_src_kernels = Path(__file__).resolve().parent.parent / "kernels"
if (_src_kernels / "__init__.py").is_file() and not any(
        isinstance(f, _KernelsFolderFinder) for f in sys.meta_path):
    sys.meta_path.append(_KernelsFolderFinder(_src_kernels))
