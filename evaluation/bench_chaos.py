"""``vitrine bench chaos``: kill -9 API and worker processes under load; nothing may be lost.

On a fresh Redis prefix and a temporary data dir seeded from the catalog (a few listings per
category), two ``vitrine serve`` API processes (Redis mode, two ports) and two
``vitrine worker --concurrency 1`` processes run as real subprocesses, each in its own process
group. A few client threads send a mixed load over HTTP: posts of new ids, re-posts of
existing ids with a new title (now and then of a deleted one), deletes. A client op is retried
on a connection error or a 5xx against the other API until it is acknowledged, and the bench
records, per id, the *last acknowledged* op and the version its answer gave. Each id belongs
to one client thread, so that record is the order the store saw the writes in.

Each cycle kills one random process (API or worker) with SIGKILL (its whole process group) at
a random moment (for a worker, the next moment within ``aim_s`` when a batch is in flight:
claimed, not committed; ``leased_at_kill`` says how many recent posts were), restarts it at
once and measures its recovery: until ``/health`` answers for an API; for a worker, until the
new process has processed an ingest task (its log shows a finished round or task; the
pending count falling is no sign, the other worker makes it fall alone).

After the load: wait until nothing is pending and both APIs report ``lag`` 0 and the same
digest (``agree_s``), then check every id against the store (``RedisStore.statuses``), a fresh
:class:`~indexer.replica.Replica` opened on the store and ``GET /listings/{id}`` on both APIs:

* ``lost``: the last acknowledged op is a post of version v, but the status is not final
  (``indexed`` or ``failed``) at v; ``failed`` counts the ones final ``failed`` at v;
* ``stale``: the status is ``indexed`` at v but the fresh replica holds another version of
  the id (or none, or another title than the acknowledged post's), or an API answers another
  version (``GET /listings/{id}``) or does not hold it (``POST /search`` by ``listing_id``);
  each API's digest must also equal the fresh replica's (``api_digests_match``; a mismatch
  counts one more stale);
* ``resurrected``: the last acknowledged op is a delete but the fresh replica still holds the
  id (or not at the delete's version), the status is not ``deleted`` at it, or an API still
  answers or finds it.

Untouched listings of the seeded catalog must still be there (``seed_missing``).

The goal: 0 lost, 0 stale, 0 resurrected over >= 10 cycles. Every subprocess is killed and
every Redis key of the prefix deleted at the end, whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.settings import Settings

from .bench_service import Proc, _free_port, delete_prefix, write_seed_csv

GOAL_CYCLES = 10


def _say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------
class Managed:
    """One API or worker slot: its current process, restarted in place after a kill."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.incarnation = 0
        self.proc: Proc | None = None

    @property
    def is_api(self) -> bool:
        return self.args[0] == "serve"

    def start(self) -> None:
        self.incarnation += 1
        self.proc = Proc(self.args, self.env, self.log_path)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}-{self.incarnation}.log"

    def log_text(self) -> str:
        p = self.log_path
        return p.read_text(errors="replace") if p.is_file() else ""

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill9()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def tail(self) -> str:
        return self.proc.tail() if self.proc is not None else ""


def _get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _search_code(port: int, lid: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/search", body=json.dumps({"listing_id": lid, "k": 1}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def _health(port: int) -> dict[str, Any] | None:
    try:
        code, body = _get(port, "/health")
    except (OSError, http.client.HTTPException):
        return None
    return json.loads(body) if code == 200 else None


# --- the clients ----------------------------------------------------------------------------
class NotAcknowledged(RuntimeError):
    pass


@dataclass
class Record:
    """The last acknowledged op of one id (``seed``: untouched listing of the catalog)."""

    op: str  # "seed" | "post" | "delete"
    version: int
    via: str = "api"  # "store": a delete retried after a lost answer, version read back
    title: str = ""


@dataclass
class ClientStats:
    ops: dict[str, int] = field(default_factory=lambda: {"post": 0, "repost": 0,
                                                         "repost_deleted": 0, "delete": 0})
    retries: int = 0
    timeouts: int = 0
    anomalies: list[str] = field(default_factory=list)


class Client(threading.Thread):
    """One load thread: owns its ids, retries every op against the other API until acked."""

    def __init__(self, k: int, ports: list[int], seed_ids: list[str], pool: list[Any],
                 store: Any, rng: random.Random, stop: threading.Event, recent: deque[Any], *,
                 think_s: tuple[float, float], photo_share: float, ack_timeout: float) -> None:
        super().__init__(name=f"chaos-client-{k}", daemon=True)
        self.k, self.ports, self.pool, self.store, self.rng = k, ports, pool, store, rng
        self.stop_ev = stop
        self.abort = threading.Event()  # the bench failed: give up the op in hand
        self.recent = recent  # (id, version) of the latest acknowledged posts, all clients
        self.think_s, self.photo_share, self.ack_timeout = think_s, photo_share, ack_timeout
        self.records: dict[str, Record] = {lid: Record("seed", 0) for lid in seed_ids}
        self.content: dict[str, Any] = {}  # id -> the catalog listing its posts are made of
        self.stats = ClientStats()
        self.error: BaseException | None = None
        self._conns: dict[int, http.client.HTTPConnection] = {}
        self._n = 0

    # -- HTTP with fail-over --
    def _conn(self, port: int) -> http.client.HTTPConnection:
        c = self._conns.get(port)
        if c is None:
            c = self._conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        return c

    def call(self, method: str, path: str, body: bytes | None = None
             ) -> tuple[int, dict[str, Any], int]:
        """Until an answer that is not a 5xx: (code, JSON body, attempts)."""
        i = self.rng.randrange(len(self.ports))
        deadline = time.monotonic() + self.ack_timeout
        attempts = 0
        headers = {"Content-Type": "application/json"} if body is not None else {}
        while True:
            attempts += 1
            port = self.ports[i]
            try:
                c = self._conn(port)
                c.request(method, path, body=body, headers=headers)
                r = c.getresponse()
                raw = r.read()
                if r.status < 500:
                    return r.status, (json.loads(raw) if raw else {}), attempts
                why = f"{r.status} {raw[:200]!r}"
            except TimeoutError as e:
                # the request may still be applied later: noted, as it could explain a newer
                # version than the acknowledged one
                self.stats.timeouts += 1
                why = repr(e)
                self._drop(port)
            except (OSError, http.client.HTTPException) as e:
                why = repr(e)
                self._drop(port)
            self.stats.retries += 1
            if self.abort.is_set():
                raise NotAcknowledged(f"{method} {path}: the bench is aborting")
            if time.monotonic() > deadline:
                raise NotAcknowledged(f"{method} {path}: no acknowledgement within "
                                      f"{self.ack_timeout:g} s (last: {why})")
            i = (i + 1) % len(self.ports)
            time.sleep(0.05 if attempts % len(self.ports) else 0.3)

    def _drop(self, port: int) -> None:
        c = self._conns.pop(port, None)
        if c is not None:
            c.close()

    # -- ops --
    def _body(self, lid: str, x: Any, title: str) -> bytes:
        b: dict[str, Any] = {"id": lid, "title": title, "description": x.description[:600]}
        if self.rng.random() < 0.5 and x.category:
            b["category"] = x.category
        if (self.rng.random() < self.photo_share and isinstance(x.image, str | Path)
                and Path(x.image).is_file()):
            b["image_base64"] = base64.b64encode(Path(x.image).read_bytes()).decode()
        return json.dumps(b).encode()

    def post(self, lid: str, x: Any, title: str, kind: str) -> None:
        code, got, _ = self.call("POST", "/listings", self._body(lid, x, title))
        if code != 202 or got.get("id") != lid or got.get("status") != "queued":
            raise RuntimeError(f"POST /listings {lid}: {code} {got}")
        # the title as the index stores it (whitespace collapsed), to check the content too
        self.records[lid] = Record("post", int(got["version"]), title=" ".join(title.split()))
        self.recent.append((lid, int(got["version"])))
        self.stats.ops[kind] += 1

    def delete(self, lid: str) -> None:
        code, got, attempts = self.call("DELETE", f"/listings/{lid}")
        if code == 200 and got.get("deleted") is True:
            self.records[lid] = Record("delete", int(got["version"]))
        elif code == 404 and attempts > 1:
            # an attempt whose answer was lost went through: this thread alone writes this
            # id, so the tombstone in the store is that delete's
            st = self.store.status(lid)
            if st is None or st.get("status") != "deleted":
                self.stats.anomalies.append(f"DELETE {lid}: 404 after a retry but status {st}")
                return
            self.records[lid] = Record("delete", int(st["version"]), via="store")
        else:
            self.stats.anomalies.append(f"DELETE {lid}: {code} {got} (attempt {attempts}, "
                                        f"last acked {self.records[lid]})")
            return
        self.stats.ops["delete"] += 1

    def step(self) -> None:
        rng = self.rng
        live = [lid for lid, r in self.records.items() if r.op != "delete"]
        gone = [lid for lid, r in self.records.items() if r.op == "delete"]
        roll = rng.random()
        if roll < 0.45 or not live:
            self._n += 1
            lid = f"chaos-{self.k}-{self._n:05d}"
            x = rng.choice(self.pool)
            self.content[lid] = x
            self.post(lid, x, x.title, "post")
        elif roll < 0.75:
            if gone and rng.random() < 0.15:
                lid, kind = rng.choice(gone), "repost_deleted"
            else:
                lid, kind = rng.choice(live), "repost"
            x = self.content.setdefault(lid, rng.choice(self.pool))
            self.post(lid, x, f"{x.title} (edit {uuid.uuid4().hex[:6]})", kind)
        else:
            self.delete(rng.choice(live))

    def run(self) -> None:
        try:
            while not self.stop_ev.is_set():
                self.step()
                self.stop_ev.wait(self.rng.uniform(*self.think_s))
        except BaseException as e:  # reported by the bench, which fails loudly
            self.error = e
        finally:
            for port in list(self._conns):
                self._drop(port)


# --- the bench ------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit in the main thread, so that the clean-up still runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _wait(cond: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def run_chaos_bench(settings: Settings, data: Path, *, broker_url: str, cycles: int = 10,
                    seed_per_category: int = 10, clients: int = 3, cycle_s: float = 8.0,
                    lease_seconds: float = 5.0, max_attempts: int = 10,
                    visibility_timeout: float = 10.0, worker_batch: int = 8,
                    snapshot_every: int = 100, photo_share: float = 0.3,
                    think_s: tuple[float, float] = (0.1, 0.6), agree_timeout: float = 600.0,
                    recovery_timeout: float = 300.0, aim_s: float = 3.0,
                    random_seed: int | None = None,
                    logs: Path | None = None) -> dict[str, Any]:
    from indexer.catalog import read_listings
    from indexer.encoders.registry import ModelRegistry
    from indexer.runtime import seed
    from indexer.state.redis_store import RedisStore

    t_begin = time.monotonic()
    random_seed = random_seed if random_seed is not None else random.SystemRandom().randrange(
        1 << 30)
    rng = random.Random(random_seed)
    csv = next(Path(data).glob("*.csv"))
    listings, _ = read_listings(csv)
    per: dict[str, list[Any]] = {}
    for x in listings:
        if x.category and len(per.setdefault(x.category, [])) < seed_per_category:
            per[x.category].append(x)
    seed_part = [x for g in per.values() for x in g]
    seed_ids = {x.id for x in seed_part}
    pool = [x for x in listings if x.id not in seed_ids]
    prefix = f"vchaos-{uuid.uuid4().hex[:8]}"
    work = settings.data_dir
    data_dir = work / "data"
    logs = logs or work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    s = settings.model_copy(update={
        "broker_url": broker_url, "redis_prefix": prefix, "data_dir": data_dir,
        "lease_seconds": lease_seconds, "max_attempts": max_attempts,
        "visibility_timeout": visibility_timeout,
    })
    env = dict(os.environ)
    env.update({
        "VITRINE_TEXT_MODEL": s.text_model, "VITRINE_IMAGE_MODEL": s.image_model,
        "VITRINE_BROKER_URL": broker_url, "VITRINE_REDIS_PREFIX": prefix,
        "VITRINE_DATA_DIR": str(data_dir), "VITRINE_TORCH_THREADS": "1",
        "VITRINE_LEASE_SECONDS": str(lease_seconds), "VITRINE_MAX_ATTEMPTS": str(max_attempts),
        "VITRINE_VISIBILITY_TIMEOUT": str(visibility_timeout), "VITRINE_RETRY_DELAY": "1",
        "VITRINE_WORKER_BATCH": str(worker_batch),
        # snapshots (and log trims) happen during the run: they are part of what is killed
        "VITRINE_SNAPSHOT_EVERY": str(snapshot_every), "VITRINE_SNAPSHOT_INTERVAL": "10",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("VITRINE_API_KEY", None)
    out: dict[str, Any] = {
        "settings": {
            "cycles": cycles, "seed_per_category": seed_per_category, "seed_size": len(seed_part),
            "clients": clients, "cycle_s": cycle_s, "lease_seconds": lease_seconds,
            "max_attempts": max_attempts, "visibility_timeout": visibility_timeout,
            "worker_batch": worker_batch, "snapshot_every": snapshot_every,
            "photo_share": photo_share, "think_s": list(think_s), "aim_s": aim_s,
            "random_seed": random_seed,
            "broker": broker_url, "prefix": prefix, "apis": 2, "workers": 2,
            "worker_concurrency": 1, "models": {"text": s.text_model, "image": s.image_model},
            "cpus": os.cpu_count(),
        },
    }
    store = RedisStore.connect(broker_url, prefix, timeout=s.broker_timeout)
    slots: list[Managed] = []
    stop = threading.Event()
    threads: list[Client] = []
    try:
        with _sigterm_unwinds():
            # --- seed, then two APIs and two workers ------------------------------------------
            t0 = time.monotonic()
            seed_file = work / "seed.csv"
            write_seed_csv(csv, seed_file, seed_ids)
            registry = ModelRegistry(s)
            _say(seed(s, store, seed_file, csv.parent / "images", registry))
            out["seed_s"] = round(time.monotonic() - t0, 1)
            ports = [_free_port(), _free_port()]
            while ports[0] == ports[1]:
                ports[1] = _free_port()
            for i, port in enumerate(ports):
                slots.append(Managed(f"api{i}", ["serve", "--port", str(port)], env, logs))
            for i in range(2):
                slots.append(Managed(f"worker{i}", ["worker", "--concurrency", "1"], env, logs))
            t0 = time.monotonic()
            for m in slots:
                m.start()
            apis, workers = slots[:2], slots[2:]

            def up() -> bool:
                for m in slots:
                    if not m.alive():
                        raise RuntimeError(f"{m.name} exited at start:\n{m.tail()}")
                return all(_health(p) is not None for p in ports) and all(
                    " ready." in m.log_text() for m in workers)

            if not _wait(up, recovery_timeout, every=0.3):
                raise RuntimeError("the APIs and workers did not start within "
                                   f"{recovery_timeout:g} s")
            out["start_s"] = round(time.monotonic() - t0, 1)
            _say(f"2 APIs (ports {ports}) and 2 workers up in {out['start_s']} s; "
                 f"prefix {prefix}, random seed {random_seed}")

            # --- load, and one kill -9 per cycle -----------------------------------------------
            seeds = sorted(seed_ids)
            recent: deque[tuple[str, int]] = deque(maxlen=64)

            def leased_now() -> int:
                """Recent posts claimed by a worker and not committed (a batch in flight)."""
                n = 0
                for lid, v in list(recent):
                    wait = store.is_pending(lid, v)
                    n += wait is not None and wait > 0
                return n
            for k in range(clients):
                threads.append(Client(
                    k, ports, seeds[k::clients], pool, store, random.Random(rng.random()), stop,
                    recent, think_s=think_s, photo_share=photo_share,
                    ack_timeout=max(120.0, recovery_timeout)))
            t_load = time.monotonic()
            for c in threads:
                c.start()
            kills: list[dict[str, Any]] = []

            def check_clients() -> None:
                for c in threads:
                    if c.error is not None:
                        raise RuntimeError(f"client {c.k} failed: {c.error!r}") from c.error

            for cycle in range(cycles):
                time.sleep(rng.uniform(0.5, cycle_s))
                check_clients()
                victim = rng.choice(slots)
                if not victim.is_api and aim_s > 0:
                    # a worker dies at the worst moment more often than by chance: wait (a
                    # little) for a batch in flight; which worker holds it is left to chance
                    _wait(leased_now, aim_s, every=0.02)
                leased_at_kill = leased_now()
                pending_at_kill = store.pending_count()
                at_s = time.monotonic() - t_load
                victim.kill9()
                t_kill = time.monotonic()
                victim.start()
                port = ports[apis.index(victim)] if victim.is_api else 0
                how = "health" if victim.is_api else "processed"

                def recovered(victim: Managed = victim, port: int = port) -> bool:
                    if not victim.alive():
                        raise RuntimeError(f"{victim.name} exited:\n{victim.tail()}")
                    if victim.is_api:
                        return _health(port) is not None
                    # the pending count falling is no sign for a worker: the other one makes
                    # it fall alone (seen: "recovered" in 1.5 s, before the new process had
                    # even loaded its models). The load goes on, so wake-ups reach it.
                    text = victim.log_text()
                    return "claimed listings" in text or "succeeded in" in text

                ok = _wait(recovered, recovery_timeout, every=0.1)
                rec = time.monotonic() - t_kill
                kills.append({"cycle": cycle + 1, "process": victim.name,
                              "at_s": round(at_s, 2),
                              "recovery_s": round(rec, 2) if ok else None, "recovered_by": how,
                              "pending_at_kill": pending_at_kill,
                              "leased_at_kill": leased_at_kill})
                _say(f"cycle {cycle + 1}/{cycles}: killed {victim.name} at {at_s:.1f} s, "
                     + (f"recovered in {rec:.1f} s ({how})" if ok else "NOT recovered"))
                if not ok:
                    raise RuntimeError(f"{victim.name} did not recover within "
                                       f"{recovery_timeout:g} s:\n{victim.tail()}")
                time.sleep(1.0)
            stop.set()
            for c in threads:
                c.join(timeout=max(180.0, recovery_timeout))
                if c.is_alive():
                    raise RuntimeError(f"client {c.k} did not finish its last op")
            check_clients()
            out["load_s"] = round(time.monotonic() - t_load, 1)

            # --- agreement ---------------------------------------------------------------------
            t0 = time.monotonic()
            last: dict[str, Any] = {}

            def agree() -> bool:
                hs = [_health(p) for p in ports]
                last.update(pending=store.pending_count(), health=hs)
                return (last["pending"] == 0 and all(h is not None for h in hs)
                        and all(h["lag"] == 0 for h in hs)  # type: ignore[index]
                        and hs[0]["digest"] == hs[1]["digest"])  # type: ignore[index]

            if not _wait(agree, agree_timeout, every=0.2):
                raise RuntimeError(
                    f"no agreement within {agree_timeout:g} s: pending {last.get('pending')}, "
                    f"health {json.dumps(last.get('health'))[:2000]}")
            out["agree_s"] = round(time.monotonic() - t0, 2)
            _say(f"agreement after {out['agree_s']} s")

            # --- the checks --------------------------------------------------------------------
            records: dict[str, Record] = {}
            stats = ClientStats()
            for c in threads:
                records.update(c.records)
                for key, n in c.stats.ops.items():
                    stats.ops[key] += n
                stats.retries += c.stats.retries
                stats.timeouts += c.stats.timeouts
                stats.anomalies += c.stats.anomalies
            out.update(_check(s, store, registry, records, ports))
            out["accepted"] = sum(stats.ops.values())
            out["ops"] = stats.ops
            out["client_retries"] = stats.retries
            out["client_timeouts"] = stats.timeouts
            out["anomalies"] = len(stats.anomalies)
            out["anomaly_examples"] = stats.anomalies[:20]
            out["cycles"] = len(kills)
            out["kills"] = kills
            recs = [k["recovery_s"] for k in kills if k["recovery_s"] is not None]
            out["worst_recovery_s"] = max(recs) if recs else None
            out["goal"] = {"cycles": GOAL_CYCLES,
                           "met": bool(len(kills) >= GOAL_CYCLES and out["lost"] == 0
                                       and out["stale"] == 0 and out["resurrected"] == 0)}
    finally:
        stop.set()
        for c in threads:
            c.abort.set()
        for c in threads:
            c.join(timeout=5)
        for m in slots:
            m.stop(timeout=15)
        store.close()
        out["redis_keys_deleted"] = delete_prefix(broker_url, prefix)
        out["total_s"] = round(time.monotonic() - t_begin, 1)
    return out


def _check(s: Settings, store: Any, registry: Any, records: dict[str, Any],
           ports: list[int]) -> dict[str, Any]:
    """lost / stale / resurrected / failed per id, against the store, a fresh replica and the
    APIs (see the module doc)."""
    from indexer.replica import Replica

    fresh = Replica.open(s, store, registry)
    state = fresh.v.state()
    digest = fresh.digest()
    api_digests = [(_health(p) or {}).get("digest") for p in ports]
    ids = sorted(records)
    sts = dict(zip(ids, store.statuses(ids), strict=True))
    lost: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    resurrected: list[dict[str, Any]] = []
    failed: list[str] = []
    seed_missing: list[str] = []

    def api_versions(lid: str) -> list[Any]:
        """Per API: the version ``GET /listings/{id}`` answers (or the HTTP code), and
        whether its replica holds the id (``POST /search`` by ``listing_id``: 200 or 404)."""
        got: list[Any] = []
        for p in ports:
            code, body = _get(p, f"/listings/{lid}", timeout=30)
            got.append(json.loads(body).get("version") if code == 200 else code)
            got.append(_search_code(p, lid) == 200)
        return got

    for lid in ids:
        r, st = records[lid], sts[lid]
        held = fresh.versions.get(lid)
        present = state.meta(lid) is not None
        if r.op == "seed":
            if not present or st is not None:
                seed_missing.append(lid)
            continue
        if r.op == "post":
            if (st is None or st.get("version") != r.version
                    or st.get("status") not in ("indexed", "failed")):
                lost.append({"id": lid, "acked_version": r.version, "status": st,
                             "replica_version": held, "in_index": present})
                continue
            if st["status"] == "failed":
                failed.append(lid)
                if held is not None and held >= r.version:
                    stale.append({"id": lid, "acked_version": r.version, "status": st,
                                  "replica_version": held, "why": "failed but held"})
                continue
            seen = api_versions(lid)
            meta = state.meta(lid)
            if (held != r.version or not present or seen[0::2] != [r.version] * len(ports)
                    or not all(seen[1::2]) or (meta is not None and meta.title != r.title)):
                stale.append({"id": lid, "acked_version": r.version, "status": st,
                              "replica_version": held, "in_index": present,
                              "replica_title": meta.title if meta else None,
                              "acked_title": r.title, "api_versions": seen})
        else:  # delete
            seen = api_versions(lid)
            if (present or st is None or st.get("status") != "deleted"
                    or st.get("version") != r.version or held != r.version
                    or seen[0::2] != [404] * len(ports) or any(seen[1::2])):
                resurrected.append({"id": lid, "acked_delete_version": r.version,
                                    "via": r.via, "status": st, "replica_version": held,
                                    "in_index": present, "api_answers": seen})
    if any(d != digest for d in api_digests):
        # an API's replica holds other (id, version) pairs than the store's log gives
        stale.append({"why": "an API's digest differs from a fresh replica's",
                      "fresh": digest, "apis": api_digests})
    return {
        "ids": len(ids), "lost": len(lost), "stale": len(stale),
        "resurrected": len(resurrected), "failed": len(failed),
        "seed_missing": len(seed_missing),
        "digest": digest, "api_digests": api_digests,
        "api_digests_match": all(d == digest for d in api_digests),
        "index_size": len(fresh.v), "log_position": fresh.pos,
        "log_trimmed_upto": store.trimmed_upto(),
        "examples": {"lost": lost[:10], "stale": stale[:10], "resurrected": resurrected[:10],
                     "failed": failed[:10], "seed_missing": seed_missing[:10]},
    }
