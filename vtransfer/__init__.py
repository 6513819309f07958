"""vtransfer: transfer learning for video classification.

The Python API mirrors the command line; the CLI is a thin skin over it::

    import vtransfer
    model = vtransfer.load_backbone("i3d", preset="tiny", num_classes=5)
    result = vtransfer.finetune("data/", backbone="vivit", policy="temporal")
"""

from __future__ import annotations

from vtransfer.utils.version import package_version

__version__ = package_version()

_API = ("load_backbone", "finetune", "evaluate", "compare_policies", "pretrain", "predict", "explain")


def __getattr__(name: str):
    # Lazy so that `import vtransfer` (and `vtransfer --help`) stays fast.
    if name in _API:
        from vtransfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'vtransfer' has no attribute {name!r}")


__all__ = list(_API) + ["__version__"]
