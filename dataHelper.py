"""Course entry point for Task 1: ``from dataHelper import get_dataset, get_fs``.

The datasets live in :mod:`peftlab.data` and are read from the repository's ``data/`` folder by
default (``PEFTLAB_DATA_DIR`` or ``data_dir=`` point elsewhere).
"""

from peftlab.data import get_dataset, get_fs

__all__ = ["get_dataset", "get_fs"]
