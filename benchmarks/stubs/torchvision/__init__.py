"""A stand-in `torchvision` for the benchmarks only (`--official-path benchmarks/stubs`).

timm imports torchvision at module level (transforms, ops) and the official DiT `models.py`
imports timm, but it uses none of torchvision. Where a real torchvision cannot be installed next
to the pinned CPU torch, this package lets the import succeed: every `torchvision.*` submodule is
an empty module whose attributes are distinct placeholder classes (distinct, because timm keys
dicts by them). Anything that calls into it gets nothing useful, which the bench never does.
"""
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"


def _placeholder(owner, name):
    """``owner.name``, made on first use: a new placeholder class, kept on ``owner``."""
    if name.startswith("__"):
        raise AttributeError(name)
    sub = _Placeholder(name, (_Any,), {})
    setattr(owner, name, sub)
    return sub


class _Placeholder(type):
    __getattr__ = _placeholder


class _Any(metaclass=_Placeholder):
    def __init__(self, *args, **kwargs):
        pass


class _Module(types.ModuleType):
    __path__ = []  # a package, so that deeper imports resolve too
    __getattr__ = _placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())


def __getattr__(name):
    return importlib.import_module(f"{__name__}.{name}")
