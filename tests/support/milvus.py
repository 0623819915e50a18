"""A real Milvus for the tests: a milvus-lite server (the pure-Python Milvus speaking the
pymilvus gRPC API) in its own process, on a free port (the one `vitrine bench stores` starts).

milvus-lite is a test dependency (pyproject's dev extra): imported here unconditionally, so
that a checkout without it fails the Milvus tests instead of skipping them.
"""

from __future__ import annotations

import milvus_lite  # noqa: F401  (the server below runs it: fail here, clearly, without it)

from evaluation.bench_stores import milvus_lite_server as milvus_server

__all__ = ["milvus_server"]
