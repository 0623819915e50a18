"""schemathesis against a real ``vitrine serve`` (embedded default): every phase (examples,
coverage, fuzzing, stateful through the schema's links), checking that no input gets a 5xx
and that every answer matches the OpenAPI schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.service import Server, copy_seed

pytestmark = pytest.mark.slow

TIME_BUDGET_S = 90  # fuzzing and stateful testing repeat until it is spent


def test_schemathesis_finds_no_server_error_and_no_schema_lie(tmp_path, seed_dir) -> None:  # type: ignore[no-untyped-def]
    server = Server(copy_seed(seed_dir, tmp_path / "data"), tmp_path / "serve.log",
                    VITRINE_API_KEY="st-key")
    try:
        st = Path(sys.executable).with_name("st")
        p = subprocess.run(
            [str(st), "run", f"{server.url}/openapi.json",
             "--phases", "examples,coverage,fuzzing,stateful",
             "--checks", "not_a_server_error,response_schema_conformance",
             # one worker: with two, schemathesis' hypothesis parses source in two threads at
             # once and CPython 3.11 can raise "SystemError: AST constructor recursion depth
             # mismatch" inside the tool (seen once in CI): a tool error, not an API one
             "--max-time", str(TIME_BUDGET_S), "--workers", "1", "--request-timeout", "30",
             "-H", "X-API-Key: st-key", "--no-color"],
            capture_output=True, text=True, timeout=TIME_BUDGET_S + 240, cwd=tmp_path)
        report = p.stdout[-8000:] + p.stderr[-2000:]
        assert p.returncode == 0, report
        # every operation of the schema was selected and tested
        import httpx

        paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
        n = sum(m in ("get", "post", "put", "delete", "patch") for ops in paths.values()
                for m in ops)
        assert f"Selected: {n}/{n}" in p.stdout and f"Tested: {n}" in p.stdout, report
        assert "Stateful" in p.stdout, report
    finally:
        server.stop()
