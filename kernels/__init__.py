"""splitserve's kernels, imported as `splitserve.kernels`.

With a checkout's root on sys.path (`python -m ...` or pytest started there), this folder is also
importable as a top-level `kernels`, the name of Hugging Face's kernels distribution, which
transformers imports (5.25 on) or probes (before). Imported under that name, this module hands
the import over to the installed distribution; without one it stays an empty package with no
version and no submodules, which transformers' probe reads as "not installed".
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        __path__ = []  # noqa: F811 - `kernels.ops` must not load our ops under the wrong name
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
