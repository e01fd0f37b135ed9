"""The whole test suite on one CUDA GPU with the Triton interpreter off (``make test-gpu``), in one call.

Runs pytest with ``LONGROLL_TEST_GPU=1`` (tests/conftest.py then requires CUDA and keeps the interpreter off):
the compiled kernels against their references in bf16/fp16 at odd shapes, every attention route's semantics on
the GPU's kernels, the rollout engine with CUDA-graph capture, resume, and the rest of the suite. The run is
bounded (``--budget`` seconds, default 540: under a 10-minute call with time to write the results), spread over
pytest-xdist workers when it is installed, and writes to ``--out``:

- ``test_gpu.xml``: JUnit XML of every test;
- ``test_gpu.log``: pytest's output (slowest tests included);
- ``test_gpu.json``: counts (passed, failed, skipped, errors), seconds, device, versions, the command.

Missing test tools (pytest, hypothesis, pytest-xdist, pytest-timeout) are installed from ``--wheels DIR`` when
given (the GPU machine has no network), else reported. Exit status: pytest's (0 = all passed).

    python3 scripts/run_gpu_tests.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"pytest": "pytest", "hypothesis": "hypothesis", "xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout"}


def _missing() -> list[str]:
    return [pkg for mod, pkg in TOOLS.items() if importlib.util.find_spec(mod) is None]


def _counts(xml: Path) -> dict[str, int]:
    if not xml.exists():
        return {}
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for test_gpu.{xml,log,json}")
    parser.add_argument("--budget", type=int, default=540, help="seconds for the whole pytest run (default 540)")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist workers sharing the GPU (default 8)")
    parser.add_argument("--wheels", help="folder of wheels to install missing test tools from (offline)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run on a machine without CUDA (checks this script, not the GPU)"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. a test file)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = _missing()
    if missing and args.wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", args.wheels, *missing]
        subprocess.run(cmd, check=False)
        missing = _missing()
    if "pytest" in missing or "hypothesis" in missing:
        print(f"missing test tools: {', '.join(missing)}; pass --wheels DIR (pip download them first)")
        return 2
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        print("no CUDA device visible: this is the GPU suite (make test on a CPU machine)")
        return 2
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT))
    if gpu:
        env["LONGROLL_TEST_GPU"] = "1"
        env.pop("TRITON_INTERPRET", None)
    xml, log = out / "test_gpu.xml", out / "test_gpu.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "--durations=25", f"--junitxml={xml}",
           "-p", "no:cacheprovider"]  # fmt: skip
    if "pytest-xdist" not in missing and args.workers > 1:
        cmd += ["-n", str(args.workers)]
    if "pytest-timeout" not in missing:
        cmd += ["--timeout", "300"]
    cmd += args.pytest_args
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        timed_out = False
        try:
            rc = proc.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            # An interrupt, not a kill: pytest then still reports what ran and writes the JUnit file.
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
    seconds = time.perf_counter() - t0
    summary = {
        "command": " ".join(cmd),
        "returncode": rc,
        "timed_out": timed_out,
        "seconds": seconds,
        "counts": _counts(xml),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu (--allow-cpu)",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
        },
        "missing_tools": missing,
    }
    (out / "test_gpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["counts"]), f"rc={rc}", f"{seconds:.0f} s", "(timed out)" if timed_out else "")
    print("".join(log.read_text().splitlines(keepends=True)[-40:]))
    return rc


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
