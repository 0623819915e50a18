"""Helpers of the worker tests: a real ``vitrine worker`` subprocess on the local Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.offline import IMAGE_SPEC, ROOT, TEXT_SPEC

REDIS = "redis://127.0.0.1:6379/0"


def worker_env(prefix: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VITRINE_TEXT_MODEL": TEXT_SPEC,
        "VITRINE_IMAGE_MODEL": IMAGE_SPEC,
        "VITRINE_BROKER_URL": REDIS,
        "VITRINE_REDIS_PREFIX": prefix,
        "VITRINE_DATA_DIR": str(data_dir),
        "VITRINE_TORCH_THREADS": "1",
        "VITRINE_VISIBILITY_TIMEOUT": "4",
        "VITRINE_LEASE_SECONDS": "6",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def inject(tmp: Path, code: str) -> dict[str, str]:
    """Environment that runs ``code`` at start-up of a Python subprocess (``sitecustomize``):
    how a test wraps product code inside a real worker without a flag in the product."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)])}


class Worker:
    """``vitrine worker`` in its own process group, so that kill -9 reaches its children."""

    def __init__(self, prefix: str, data_dir: Path, log: Path, *, concurrency: int = 1,
                 **env: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitrine.cli", "worker", "--concurrency", str(concurrency)],
            cwd=ROOT, env=worker_env(prefix, data_dir, **env), stdout=log.open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()
