"""The one "ingest a listing" use case: claimed events in, committed outcomes out.

The Celery task, the embedded consumer thread and the benchmarks call :meth:`Ingestor.run`;
nothing else turns an accepted listing into an index entry. One round:

1. **claim** up to ``limit`` pending events from the store (each claim counts an attempt;
   an event past ``max_attempts`` ends ``failed`` there, with the reason: a dead letter);
2. **decide** (:func:`decide`): photos (from the store, or the seller's URL), validation,
   one embedding batch, fusion, a vote among the labelled neighbours of the replica's
   current state, the review reasons and near-duplicates (:mod:`indexer.review`) -> one
   :class:`~indexer.state.Outcome` per event, with an upsert log entry when the listing is
   indexed;
3. **commit** the outcomes conditionally: an outcome whose version is no longer the
   listing's latest (a re-post or a delete came in meanwhile) changes nothing.

A round that raises is retried event by event; an event that raises alone goes back to the
store with a delay (its attempt counted), so a poison listing ends ``failed`` after
``max_attempts`` instead of looping, and never sinks the others. A listing that *kills* its
process (the OOM killer) takes its batch mates down with it once; after that, every event
claimed again (``attempts > 1``, a *suspect*) runs alone, one per round, the others given
back untried (their attempt refunded): only the killer keeps being charged. A store failure
(:class:`~indexer.state.StoreUnavailable`) propagates: the leases expire and the events come
back by themselves.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .catalog import make_listing
from .errors import ImageError, VitrineError
from .images import image_limits
from .pipeline import Vitrine
from .review import (
    ThumbTags,
    category_key,
    evidence,
    find_duplicates,
    known_categories,
    review_reasons,
)
from .settings import Settings
from .state import Event, Outcome, StateStore, StoreUnavailable
from .thumbs import etag, make_thumbnail

log = logging.getLogger(__name__)
FetchPhoto = Callable[[str], bytes]  # image_url -> bytes, raising ImageError


@dataclass
class Round:
    """What one :meth:`Ingestor.run` did: outcomes committed, and events given back."""

    committed: list[Outcome]
    released: int = 0
    claimed: int = 0


def decide(vitrine: Vitrine, events: Sequence[Event], photos: Sequence[bytes | None],
           warnings: Sequence[str | None], batch: str, *,
           tags: ThumbTags | None = None) -> list[Outcome]:
    """Outcomes of ``events`` against ``vitrine``'s current state (no store, no I/O but
    ``tags``: the thumbnail hashes of indexed listings, for the same-photo duplicate test;
    without it only the similarity test runs)."""
    out: list[Outcome | None] = [None] * len(events)
    rows: list[tuple[int, Any]] = []
    for i, (e, photo) in enumerate(zip(events, photos, strict=True)):
        p = e.payload
        try:
            listing = make_listing(e.id, p.get("title") or "", p.get("description") or "",
                                   image=photo, category=p.get("category"))
        except VitrineError as err:
            out[i] = failed(e, str(err))
            continue
        rows.append((i, listing))
    if rows:
        limits = image_limits(vitrine.settings)
        state = vitrine.state()  # one view for the embedding (lexical), fusion and votes
        known = known_categories(state.view)  # the taxonomy's first levels
        emb = vitrine.embed([x for _, x in rows], state=state)
        fused = vitrine.fuse(emb, state=state)
        # thumbnails (a second, small decode of the photo: JPEG at 1/8 scale, off the request
        # path) and the near-duplicate check, for the whole batch at once
        thumbs = [None if j in emb.failed else make_thumbnail(photos[i], limits)
                  for j, (i, _) in enumerate(rows)]
        thumb_tags = [etag(t) if t is not None else None for t in thumbs]
        dups = find_duplicates(vitrine, fused, [x.id for _, x in rows], state, thumb_tags,
                               tags)
        for j, (i, listing) in enumerate(rows):
            e = events[i]
            if j in emb.failed:
                out[i] = failed(e, emb.problems[j])
                continue
            vote = vitrine.vote_vector(fused[j], exclude=listing.id, state=state)
            seller = listing.category
            # a known category in the taxonomy's spelling ("watches" is "Watches"); an
            # unknown one does not vote until an operator accepts it (indexer.review); an
            # index with no label at all has no taxonomy to hold it to yet
            unknown = False
            if seller is not None and known:
                unknown = category_key(seller) not in known
                seller = known.get(category_key(seller), seller)
            category = seller or vote.category
            source = ("predicted" if seller is None else
                      "unconfirmed" if unknown else "seller")
            # the predicted path under the listing's category; a seller's category the vote
            # disagrees with has no known levels below it
            path = vote.category_path if category == vote.category else [category]
            jpeg, tag, duplicates = thumbs[j], thumb_tags[j], dups[j]
            status: dict[str, Any] = {
                "status": "indexed", "version": e.version, "category": category,
                "confidence": vote.confidence, "uncertain": vote.uncertain, "source": source,
                "predicted": vote.category, "batch": batch, "batch_size": len(rows),
                "category_path": [c for c in path if c],
                "path_confidence": vote.path_confidence if category == vote.category else [],
                "title": listing.title,
            }
            if vote.uncertain_reason:
                status["uncertain_reason"] = vote.uncertain_reason
            if duplicates:
                status["duplicates"] = duplicates
            reasons = review_reasons(seller, unknown, vote, duplicates)
            if reasons:
                # what the operator needs to decide, kept with the status it is about
                status["review"] = reasons
                status["evidence"] = {"neighbours": evidence(vote),
                                      "predicted_path": vote.category_path,
                                      "predicted_confidence": vote.confidence}
            warning = warnings[i] or emb.problems.get(j)
            if warning:
                status["warning"] = warning
            entry = {
                "op": "upsert", "id": listing.id, "version": e.version, "vec": fused[j],
                # only the seller's label votes: a predicted path is not fed back as one
                "meta": {"title": listing.title, "category": category, "source": source,
                         "category_path": [seller] if seller else []},
                "confidence": vote.confidence, "uncertain": vote.uncertain,
            }
            out[i] = Outcome(e.id, e.version, status, entry,
                             (tag, jpeg) if tag is not None and jpeg is not None else None)
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def failed(e: Event, error: str) -> Outcome:
    return Outcome(e.id, e.version, {"status": "failed", "version": e.version, "error": error})


class Ingestor:
    """Claims, decides and commits for one process (see the module doc)."""

    def __init__(self, settings: Settings, store: StateStore, vitrine: Callable[[], Vitrine],
                 fetch: FetchPhoto) -> None:
        self.settings = settings
        self.store = store
        self._vitrine = vitrine  # the replica's current Vitrine (it changes on reload)
        self.fetch = fetch

    def run(self, limit: int | None = None, *,
            interrupts: tuple[type[BaseException], ...] = ()) -> Round:
        """One round. ``interrupts``: exceptions that stop the round without being the
        listings' fault (a task's time limit): the events go back untried, and it re-raises."""
        s = self.settings
        claimed = self.store.claim(limit or s.worker_batch, s.lease_seconds, s.max_attempts)
        committed = list(claimed.given_up)
        for o in claimed.given_up:
            log.warning("listing %r gave up: %s", o.id, o.status.get("error"))
        if not claimed.events:
            return Round(committed, 0, 0)
        batch = uuid.uuid4().hex[:12]
        events = claimed.events
        suspect = next((e for e in events if e.attempts > 1), None)
        if suspect is not None and len(events) > 1:
            self.store.release([e for e in events if e is not suspect], refund=True)
            events = [suspect]
        retry: list[Event] = []
        try:
            outcomes = self._decide(events, batch)
        except StoreUnavailable:
            raise
        except interrupts:
            self.store.release(events, refund=True)
            raise
        except Exception:
            if len(events) == 1:
                log.exception("indexing listing %r failed", events[0].id)
                outcomes, retry = [], events
            else:
                log.exception("indexing a batch of %d listings failed; retrying them one by "
                              "one", len(events))
                outcomes, retry = self._one_by_one(events, batch, interrupts)
        if retry:
            self.store.release(retry, delay_s=s.retry_delay)
        ok = self.store.commit(outcomes) if outcomes else []
        return Round(committed + [o for o, c in zip(outcomes, ok, strict=True) if c],
                     len(retry), len(events))

    def _one_by_one(self, events: Sequence[Event], batch: str,
                    interrupts: tuple[type[BaseException], ...]
                    ) -> tuple[list[Outcome], list[Event]]:
        """Each event alone: (outcomes of those that went through, those that raised)."""
        outcomes: list[Outcome] = []
        retry: list[Event] = []
        for i, e in enumerate(events):
            try:
                outcomes += self._decide([e], batch)
            except StoreUnavailable:
                raise
            except interrupts:
                self.store.release(events[i:], refund=True)
                self.store.release(retry, delay_s=self.settings.retry_delay)
                self.store.commit(outcomes)
                raise
            except Exception:
                log.exception("indexing listing %r failed", e.id)
                retry.append(e)
        return outcomes, retry

    def _decide(self, events: Sequence[Event], batch: str) -> list[Outcome]:
        photos: list[bytes | None] = []
        warnings: list[str | None] = [None] * len(events)
        urls = [e.payload["image_url"] for e in events
                if not e.has_photo and e.payload.get("image_url")]
        fetched = self._fetch_all(urls)
        for i, e in enumerate(events):
            photo = self.store.photo(e) if e.has_photo else None
            url = e.payload.get("image_url")
            if photo is None and url:
                got = fetched.get(url)
                if isinstance(got, bytes):
                    photo = got
                elif got is not None:
                    warnings[i] = f"photo not used: {got}"
            photos.append(photo)
        return decide(self._vitrine(), events, photos, warnings, batch,
                      tags=self.store.thumbnail_tags)

    def _fetch_all(self, urls: list[str]) -> dict[str, bytes | ImageError]:
        """Fetch photo URLs several at a time: the wait is network I/O, not CPU."""
        def one(url: str) -> bytes | ImageError:
            try:
                return self.fetch(url)
            except ImageError as e:
                return e

        uniq = list(dict.fromkeys(urls))
        if len(uniq) <= 1:
            return {u: one(u) for u in uniq}
        with ThreadPoolExecutor(max_workers=min(8, len(uniq)),
                                thread_name_prefix="fetch") as pool:
            return dict(zip(uniq, pool.map(one, uniq), strict=True))
