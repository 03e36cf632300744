"""The checkout's kernels/ folder never stands in for Hugging Face's `kernels` distribution.

transformers (5.25 on) imports `kernels`; with the checkout's root on sys.path, which is how
`python -m pytest` and workers started from the checkout run, Python finds kernels/ first.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import kernels, sys; print(kernels.__file__); print(getattr(kernels, 'MARK', None))"


def run_from_checkout(code: str, extra_path: str | None = None, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_an_installed_kernels_distribution_wins_over_the_checkout(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("MARK = 'the installed one'\n")
    done = run_from_checkout(PROBE, str(tmp_path))
    assert done.returncode == 0, done.stderr
    path, mark = done.stdout.split("\n")[:2]
    assert Path(path) == fake / "__init__.py"
    assert mark == "the installed one"


def test_without_one_the_name_is_an_empty_package_that_transformers_skips():
    """`-S`: no site-packages, so no installed `kernels` either. transformers (before 5.25) imports
    a `kernels` without metadata to read its version: that import must work and find none."""
    done = run_from_checkout(
        "import kernels\n"
        "assert not hasattr(kernels, '__version__')\n"
        "try:\n"
        "    import kernels.ops\n"
        "except ModuleNotFoundError:\n"
        "    print('no submodules')\n", None, "-S")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no submodules"


def test_ours_still_imports_as_splitserve_kernels():
    done = subprocess.run([sys.executable, "-c", "import splitserve.kernels.ops as o; print(o.__file__)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT / "kernels" / "ops.py"
