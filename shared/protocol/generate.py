"""Regenerate the Python gRPC stubs of `proto/splitserve/v1/*.proto` into this package.

    python -m splitserve.shared.protocol.generate

protoc writes `splitserve/v1/worker_pb2.py` etc. with absolute imports (`from splitserve.v1 import
worker_pb2`) that do not match where the stubs live (`splitserve.shared.protocol`); we flatten the
output into one folder and rewrite those imports to package-relative ones. Needs grpcio-tools
(a dev dependency); the generated files are committed, so nothing else does.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent.parent / "proto"
PROTO_PACKAGE_DIR = Path("splitserve") / "v1"

# `from splitserve.v1 import worker_pb2 as x` -> `from . import worker_pb2 as x`
_ABSOLUTE_IMPORT = re.compile(r"^from splitserve\.v1 import (\w+_pb2)", re.MULTILINE)
# `import worker_pb2 as x` (protoc's form when the proto sits at the include root)
_BARE_IMPORT = re.compile(r"^import (\w+_pb2) as", re.MULTILINE)


class ProtocError(RuntimeError):
    """protoc rejected a .proto file; the message carries protoc's exit status."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files of the `splitserve.v1` package, sorted (relative to `proto_root`)."""
    files = sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE_DIR}")
    return [f.relative_to(proto_root) for f in files]


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` into `out_dir`; return the files written."""
    from grpc_tools import protoc  # deferred: only needed when regenerating

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="splitserve-protoc-") as tmp:
        args = ["protoc", f"-I{proto_root}", f"-I{_grpc_tools_include()}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        status = protoc.main(args + [str(p) for p in proto_files(proto_root)])
        if status != 0:
            raise ProtocError(f"protoc failed with exit status {status} on {proto_root}")
        written = []
        for produced in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            target = out_dir / produced.name
            target.write_text(_make_imports_relative(produced.read_text()))
            written.append(target)
    return written


def _make_imports_relative(source: str) -> str:
    source = _ABSOLUTE_IMPORT.sub(r"from . import \1", source)
    return _BARE_IMPORT.sub(r"from . import \1 as", source)


def _grpc_tools_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def main() -> int:
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
