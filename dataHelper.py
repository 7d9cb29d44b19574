"""Course entry point for Task 1: ``from dataHelper import get_dataset``.

The datasets live in :mod:`peftlab.data`; set ``PEFTLAB_DATA_DIR`` (or pass ``data_dir=``) to the
folder that holds ``restaurant_sup/``, ``laptop_sup/``, ``acl_sup/`` and ``agnews_sup/``.
"""

from peftlab.data import get_dataset, get_fs

__all__ = ["get_dataset", "get_fs"]
