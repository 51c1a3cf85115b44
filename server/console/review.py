"""Logging in, the review queue and blind pairwise rounds.

Reviewing needs the ``review`` scope on the adapter (with auth off, whoever reaches the console
on loopback may). Every action is a ``Registry`` call recorded under the reviewer's key name
and audited; a review never replaces a customer's feedback, it is stored beside it.
"""

from __future__ import annotations

from datetime import date
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from loraflow.registry import domain
from loraflow.registry.errors import InvalidArgumentError, LoraflowError, NotFoundError, PermissionDeniedError
from loraflow.registry.reviews import preference
from loraflow.server.console import queue
from loraflow.server.console.context import check_csrf, console_of, viewer_of
from loraflow.server.console.session import Viewer

router = APIRouter()
PAGE_SIZE = 50


# -- logging in --------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    console = console_of(request)
    if not console.auth:
        return RedirectResponse("/", status_code=303)
    return console.render(request, "login.html.j2", error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    fields = await check_csrf(request)
    console = console_of(request)
    try:
        request.state.session = console.login(fields.get("key", ""))
    except LoraflowError as exc:
        return console.render(request, "login.html.j2", status_code=401, error=exc)
    return RedirectResponse("/", status_code=303)


@router.post("/logout")
async def logout(request: Request) -> Response:
    await check_csrf(request)
    request.state.session = console_of(request).signer.new()
    return RedirectResponse("/login" if console_of(request).auth else "/", status_code=303)


# -- the review queue --------------------------------------------------------------------------
def _reviewer(request: Request, adapter: str) -> Viewer:
    viewer = viewer_of(request)
    if not viewer.sees(adapter):
        raise NotFoundError(f"no adapter named {adapter!r}", param="adapter")
    if not viewer.may_review(adapter):
        raise PermissionDeniedError(
            f"reviewing {adapter}'s outputs needs a key with the 'review' scope", param="key"
        )
    return viewer


def _filters(request: Request) -> queue.Filters:
    q = request.query_params
    version = day = None
    try:
        version = int(q["version"]) if q.get("version") else None
    except ValueError:
        raise InvalidArgumentError(f"version is a number, not {q['version']!r}", param="version") from None
    try:
        day = date.fromisoformat(q["day"]) if q.get("day") else None
    except ValueError:
        raise InvalidArgumentError(
            f"day is a date such as 2026-12-01, not {q['day']!r}", param="day"
        ) from None
    slice_, rating, category = q.get("slice") or None, q.get("rating") or None, q.get("category") or None
    if slice_ is not None and slice_ not in queue.SLICES:
        raise InvalidArgumentError(f"no slice {slice_!r}; slices: {', '.join(queue.SLICES)}", param="slice")
    if rating is not None and rating not in queue.RATINGS:
        raise InvalidArgumentError(f"no rating filter {rating!r}; {', '.join(queue.RATINGS)}", param="rating")
    if category is not None and category not in console_of(request).settings.console.categories:
        raise InvalidArgumentError(f"no category {category!r}", param="category")
    return queue.Filters(version=version, day=day, slice=slice_, rating=rating, category=category)


@router.get("/review", response_class=HTMLResponse)
def review_home(request: Request) -> Response:
    console, viewer = console_of(request), viewer_of(request)
    adapters = [a for a in console.registry.adapters() if viewer.may_review(a.name)]
    evaluations = {a.name: list(reversed(console.registry.evaluations(a.name)))[:5] for a in adapters}
    rollouts = {
        a.name: [r for r in console.registry.rollouts(a.name) if any(s.shadow for s in r.steps)]
        for a in adapters
    }
    return console.render(
        request, "review_home.html.j2", adapters=adapters, evaluations=evaluations, rollouts=rollouts
    )


@router.get("/review/{adapter}", response_class=HTMLResponse)
def review_queue(request: Request, adapter: str) -> Response:
    _reviewer(request, adapter)
    console = console_of(request)
    filters = _filters(request)
    everything = queue.items(console.registry, adapter, days=console.settings.console.review_window_days)
    shown = [i for i in everything if filters.keep(i)]
    info = console.registry.get(adapter)
    return console.render(
        request,
        "review_queue.html.j2",
        adapter=info,
        items=shown[:PAGE_SIZE],
        start=next((i.request_id for i in shown if i.review is None), shown[0].request_id if shown else None),
        total=len(shown),
        reviewed=sum(i.review is not None for i in everything),
        everything=len(everything),
        filters=filters,
        query=urlencode(filters.query()),
        slices=queue.SLICES,
        ratings=queue.RATINGS,
        categories=console.settings.console.categories,
        versions=sorted({v.version for v in info.versions}),
    )


@router.get("/review/{adapter}/r/{request_id}", response_class=HTMLResponse)
def review_item(request: Request, adapter: str, request_id: str) -> Response:
    _reviewer(request, adapter)
    console = console_of(request)
    filters = _filters(request)
    everything = queue.items(console.registry, adapter, days=console.settings.console.review_window_days)
    item = next((i for i in everything if i.request_id == request_id), None)
    if item is None:
        raise NotFoundError(f"no sampled request {request_id!r} of {adapter}", param="request_id")
    earlier = [r for r in console.registry.reviews(adapter) if r.request_id == request_id]
    return console.render(
        request,
        "review_item.html.j2",
        adapter=console.registry.get(adapter),
        item=item,
        earlier=list(reversed(earlier)),
        categories=console.settings.console.categories,
        query=urlencode(filters.query()),
        next_id=_next(everything, filters, request_id),
    )


def _next(everything: list[queue.Item], filters: queue.Filters, after: str) -> str | None:
    """The next request in the queue's order that the filters keep and nobody has reviewed."""
    ids = [i.request_id for i in everything]
    start = ids.index(after) + 1 if after in ids else 0
    for item in everything[start:]:
        if item.review is None and filters.keep(item):
            return item.request_id
    return None


@router.post("/review/{adapter}/r/{request_id}")
async def review_submit(request: Request, adapter: str, request_id: str) -> Response:
    form = await request.form()
    fields = await check_csrf(request)
    viewer = _reviewer(request, adapter)
    console = console_of(request)
    rating_text = fields.get("rating", "").strip()
    if rating_text not in ("", "1", "+1", "-1"):
        raise InvalidArgumentError(f"rating is +1 or -1, not {rating_text!r}", param="rating")
    categories = [c for c in form.getlist("category") if isinstance(c, str)]
    correction = fields.get("correction") or None
    console.registry.add_review(
        request_id,
        reviewer=viewer.name,
        redactor=console.redactor,
        rating=int(rating_text) if rating_text else None,
        correction=correction,
        categories=categories,
        adapter=adapter,
    )
    filters = _filters(request)
    everything = queue.items(console.registry, adapter, days=console.settings.console.review_window_days)
    following = _next(everything, filters, request_id)
    query = urlencode(filters.query())
    target = f"/review/{adapter}/r/{following}" if following else f"/review/{adapter}"
    return RedirectResponse(f"{target}?{query}" if query else target, status_code=303)


# -- blind pairwise rounds ---------------------------------------------------------------------
def _round(request: Request, source: str, source_id: int) -> queue.Round:
    registry = console_of(request).registry
    if source == "evaluation":
        rnd = queue.evaluation_round(registry.evaluation(source_id))
    elif source == "rollout":
        found = next((r for r in registry.rollouts() if r.id == source_id), None)
        if found is None:
            raise NotFoundError(f"no rollout {source_id}", param="rollout")
        rnd = queue.rollout_round(registry, found)
    else:
        raise NotFoundError(f"no pairwise source {source!r}; evaluation or rollout", param="source")
    _reviewer(request, rnd.adapter)
    return rnd


def _remaining(request: Request, rnd: queue.Round, reviewer: str) -> list[queue.Pair]:
    done = {
        v.item
        for v in console_of(request).registry.pairwise_votes(rnd.source, rnd.source_id)
        if v.reviewer == reviewer
    }
    return [p for p in rnd.pairs if p.item not in done]


@router.get("/pairwise/{source}/{source_id}", response_class=HTMLResponse)
def pairwise(request: Request, source: str, source_id: int) -> Response:
    rnd = _round(request, source, source_id)
    viewer = viewer_of(request)
    console = console_of(request)
    left = _remaining(request, rnd, viewer.name)
    pair = left[0] if left else None
    flipped = console.signer.coin(rnd.source, rnd.source_id, pair.item, viewer.name) if pair else False
    answers = (
        (pair.baseline, pair.candidate)
        if pair and flipped
        else (pair.candidate, pair.baseline)
        if pair
        else ()
    )
    return console.render(
        request,
        "pairwise.html.j2",
        rnd=rnd,
        pair=pair,
        answers=answers,
        left=len(left),
        preference=preference(console.registry.pairwise_votes(rnd.source, rnd.source_id)),
    )


_PICKS = ("a", "b", "tie")


@router.post("/pairwise/{source}/{source_id}")
async def pairwise_vote(request: Request, source: str, source_id: int) -> Response:
    fields = await check_csrf(request)
    rnd = _round(request, source, source_id)
    viewer = viewer_of(request)
    console = console_of(request)
    item, pick = fields.get("item", ""), fields.get("pick", "")
    if pick not in _PICKS:
        raise InvalidArgumentError(f"pick is a, b or tie, not {pick!r}", param="pick")
    if item not in {p.item for p in rnd.pairs}:
        raise NotFoundError(f"item {item!r} is not in this round", param="item")
    # The order was the signer's coin for this reviewer and item: A was the candidate unless flipped.
    flipped = console.signer.coin(rnd.source, rnd.source_id, item, viewer.name)
    choice: domain.PairwiseChoice = "tie"
    if pick != "tie":
        choice = "candidate" if (pick == "a") != flipped else "baseline"
    console.registry.add_pairwise_vote(
        rnd.adapter,
        source=rnd.source,
        source_id=rnd.source_id,
        item=item,
        candidate=rnd.candidate,
        baseline=rnd.baseline,
        choice=choice,
        reviewer=viewer.name,
    )
    return RedirectResponse(f"/pairwise/{source}/{source_id}", status_code=303)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
