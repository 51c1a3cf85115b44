"""The registry, browsable: adapters, versions, aliases and their history, lineage, the stored
eval and drift pages, rollouts, diffs and datasets; and the operator's actions (promote, roll
back, pause, resume or abort a rollout) through the same ``Registry`` calls as the CLI."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from loraflow.registry import domain
from loraflow.registry.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from loraflow.registry.refs import DEFAULT_ALIAS, version_ref
from loraflow.registry.reviews import category_summary, preference, reviewed_counts
from loraflow.server.console.context import STORED_PAGE_CSP, check_csrf, console_of, viewer_of
from loraflow.server.console.session import Viewer

router = APIRouter()


def _adapter(request: Request, name: str) -> tuple[Viewer, domain.AdapterInfo]:
    """The adapter, if the viewer may see it; one that it may not see is as missing as one that
    does not exist, so a key cannot probe which adapters there are."""
    viewer = viewer_of(request)
    if not viewer.sees(name):
        raise NotFoundError(f"no adapter named {name!r}", param="adapter")
    return viewer, console_of(request).registry.get(name)


def headline(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each system's primary metric with its interval, and the candidate's difference from it."""
    metric = report.get("primary_metric")
    rows = []
    for key, system in (report.get("systems") or {}).items():
        stats = (system.get("metrics") or {}).get(metric) or {}
        diff = ((report.get("comparisons") or {}).get(key) or {}).get(metric) or {}
        rows.append(
            {
                "key": key,
                "label": system.get("label", key),
                "mean": stats.get("mean"),
                "ci": stats.get("ci"),
                "diff": diff.get("diff"),
                "diff_ci": diff.get("ci"),
            }
        )
    return rows


@router.get("/", response_class=HTMLResponse)
def adapters(request: Request) -> Response:
    console, viewer = console_of(request), viewer_of(request)
    registry = console.registry
    shown = [a for a in registry.adapters() if viewer.sees(a.name)]
    active = {r.adapter: r for r in registry.rollouts() if r.state in domain.ACTIVE_ROLLOUT_STATES}
    return console.render(request, "adapters.html.j2", adapters=shown, rollouts=active)


@router.get("/adapters/{name}", response_class=HTMLResponse)
def adapter(request: Request, name: str) -> Response:
    viewer, info = _adapter(request, name)
    registry = console_of(request).registry
    reviews = registry.reviews(name)
    return console_of(request).render(
        request,
        "adapter.html.j2",
        adapter=info,
        history=registry.history(name),
        evaluations=list(reversed(registry.evaluations(name))),
        drift=list(reversed(registry.drift_history(name))),
        rollouts=registry.rollouts(name),
        categories=category_summary(reviews),
        reviewed=reviewed_counts(reviews),
        aliases_of=_aliases_of(info),
        may_review=viewer.may_review(name),
    )


def _aliases_of(info: domain.AdapterInfo) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias, version in sorted(info.aliases.items()):
        out.setdefault(version, []).append(alias)
    return out


@router.get("/adapters/{name}/v/{version}", response_class=HTMLResponse)
def version_page(request: Request, name: str, version: int) -> Response:
    viewer, info = _adapter(request, name)
    registry = console_of(request).registry
    v = registry.get_version(name, version)
    history = registry.history(name)
    dataset = registry.get_dataset(v.dataset) if v.dataset else None
    evaluations = list(reversed(registry.evaluations(name, version)))
    reviews = registry.reviews(name, version)
    return console_of(request).render(
        request,
        "version.html.j2",
        adapter=info,
        v=v,
        dataset=dataset,
        evaluations=evaluations,
        headline=headline(evaluations[0].report) if evaluations else [],
        gate=registry.gate(name, version) if evaluations else None,
        drift=list(reversed(registry.drift_history(name, version))),
        moves=[m for m in history.moves if m.to_version == version or m.from_version == version],
        categories=category_summary(reviews).get(version, {}),
        reviewed=reviewed_counts(reviews).get(version),
        aliases=_aliases_of(info).get(version, []),
        others=[x.version for x in info.versions if x.version != version],
        may_review=viewer.may_review(name),
    )


@router.get("/adapters/{name}/diff", response_class=HTMLResponse)
def diff(request: Request, name: str, a: int, b: int) -> Response:
    _, info = _adapter(request, name)
    changes = console_of(request).registry.diff(name, a, b)
    return console_of(request).render(request, "diff.html.j2", adapter=info, a=a, b=b, changes=changes)


# -- reports -----------------------------------------------------------------------------------
@router.get("/evaluations/{evaluation_id}", response_class=HTMLResponse)
def evaluation(request: Request, evaluation_id: int) -> Response:
    registry = console_of(request).registry
    ev = registry.evaluation(evaluation_id)
    viewer, info = _adapter(request, ev.adapter)
    return console_of(request).render(
        request,
        "evaluation.html.j2",
        adapter=info,
        ev=ev,
        headline=headline(ev.report),
        preference=preference(registry.pairwise_votes("evaluation", ev.id)),
        may_review=viewer.may_review(ev.adapter),
    )


@router.get("/evaluations/{evaluation_id}/page", response_class=HTMLResponse)
def evaluation_page(request: Request, evaluation_id: int) -> Response:
    registry = console_of(request).registry
    ev = registry.evaluation(evaluation_id)
    _adapter(request, ev.adapter)
    return _stored_page(registry.page(ev.page_digest) if ev.page_digest else None, "eval report")


@router.get("/drift/{report_id}", response_class=HTMLResponse)
def drift(request: Request, report_id: int) -> Response:
    report = console_of(request).registry.drift_report(report_id)
    _, info = _adapter(request, report.adapter)
    return console_of(request).render(request, "drift.html.j2", adapter=info, report=report)


@router.get("/drift/{report_id}/page", response_class=HTMLResponse)
def drift_page(request: Request, report_id: int) -> Response:
    registry = console_of(request).registry
    report = registry.drift_report(report_id)
    _adapter(request, report.adapter)
    return _stored_page(registry.page(report.page_digest) if report.page_digest else None, "drift report")


def _stored_page(html: str | None, what: str) -> Response:
    if html is None:
        raise NotFoundError(
            f"this {what} was stored before reports kept their pages; run it again to get one", param="page"
        )
    return HTMLResponse(html, headers={"content-security-policy": STORED_PAGE_CSP})


@router.get("/adapters/{name}/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout(request: Request, name: str, rollout_id: int) -> Response:
    viewer, info = _adapter(request, name)
    registry = console_of(request).registry
    found = next((r for r in registry.rollouts(name) if r.id == rollout_id), None)
    if found is None:
        raise NotFoundError(f"{name} has no rollout {rollout_id}", param="rollout")
    verdict = registry.rollout_verdict(found) if found.state in domain.ACTIVE_ROLLOUT_STATES else None
    shadowed = any(step.shadow for step in found.steps)
    return console_of(request).render(
        request,
        "rollout.html.j2",
        adapter=info,
        rollout=found,
        verdict=verdict,
        shadowed=shadowed,
        preference=preference(registry.pairwise_votes("rollout", found.id)) if shadowed else None,
        may_review=viewer.may_review(name),
    )


# -- datasets ----------------------------------------------------------------------------------
def _visible_datasets(request: Request) -> list[domain.DatasetVersionInfo]:
    """Every dataset for an operator (and with auth off); for any other key, those its adapters'
    versions were trained on or built from."""
    viewer, registry = viewer_of(request), console_of(request).registry
    datasets = registry.datasets()
    if viewer.operator:
        return datasets
    used = {v.dataset for a in registry.adapters() if viewer.sees(a.name) for v in a.versions if v.dataset}
    names = {d.name for d in datasets if d.ref in used or viewer.sees(str(d.lineage.get("adapter") or ""))}
    return [d for d in datasets if d.name in names]


@router.get("/datasets", response_class=HTMLResponse)
def datasets(request: Request) -> Response:
    return console_of(request).render(request, "datasets.html.j2", datasets=_visible_datasets(request))


@router.get("/datasets/{name}/v/{version}", response_class=HTMLResponse)
def dataset(request: Request, name: str, version: int) -> Response:
    ref = version_ref(name, version)
    found = next((d for d in _visible_datasets(request) if d.ref == ref), None)
    if found is None:
        raise NotFoundError(f"no dataset {ref}", param="dataset")
    registry = console_of(request).registry
    trained = [
        (a.name, v.version)
        for a in registry.adapters()
        if viewer_of(request).sees(a.name)
        for v in a.versions
        if v.dataset == ref
    ]
    return console_of(request).render(request, "dataset.html.j2", ds=found, trained=trained)


# -- operator actions --------------------------------------------------------------------------
def _operator(request: Request, name: str) -> Viewer:
    viewer, _ = _adapter(request, name)
    if not viewer.operator:
        raise PermissionDeniedError("this needs a key with the 'operator' scope", param="key")
    return viewer


def _version(text: str, field: str) -> int:
    try:
        return int(text.strip().removeprefix("v"))
    except ValueError:
        raise InvalidArgumentError(f"{field} must be a version number, not {text!r}", param=field) from None


@router.post("/adapters/{name}/promote")
async def promote(request: Request, name: str) -> Response:
    fields = await check_csrf(request)
    viewer = _operator(request, name)
    expect = fields.get("expect", "").strip()
    registry = console_of(request).registry.with_actor(viewer.name)
    registry.promote(
        name,
        _version(fields.get("version", ""), "version"),
        alias=fields.get("alias", DEFAULT_ALIAS).strip() or DEFAULT_ALIAS,
        expect=_version(expect, "expect") if expect else None,
    )
    return RedirectResponse(f"/adapters/{name}", status_code=303)


@router.post("/adapters/{name}/rollback")
async def rollback(request: Request, name: str) -> Response:
    fields = await check_csrf(request)
    viewer = _operator(request, name)
    alias = fields.get("alias", DEFAULT_ALIAS).strip() or DEFAULT_ALIAS
    console_of(request).registry.with_actor(viewer.name).rollback(name, alias=alias)
    return RedirectResponse(f"/adapters/{name}", status_code=303)


@router.post("/adapters/{name}/rollouts/{rollout_id}/{action}")
async def rollout_action(request: Request, name: str, rollout_id: int, action: str) -> Response:
    fields = await check_csrf(request)
    viewer = _operator(request, name)
    registry = console_of(request).registry.with_actor(viewer.name)
    current = registry.rollout(name)
    if current is None or current.id != rollout_id:
        raise NotFoundError(f"rollout {rollout_id} of {name} is not running", param="rollout")
    if action == "pause":
        registry.pause_rollout(name)
    elif action == "resume":
        registry.resume_rollout(name)
    elif action == "abort":
        registry.abort_rollout(name, reason=fields.get("reason", "").strip() or None)
    else:
        raise NotFoundError(f"no rollout action {action!r}; pause, resume or abort", param="action")
    return RedirectResponse(f"/adapters/{name}/rollouts/{rollout_id}", status_code=303)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
