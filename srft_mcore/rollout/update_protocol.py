"""The HTTP side of one weight update on one SGLang server: a POST that turns SGLang's
failure answers into :class:`WeightSyncError`, and the steps around the transfer (pause,
flush, the begin/end session where the server has it, version tag and check, continue)."""
from __future__ import annotations

from typing import Optional

import requests

from srft_mcore.rollout.errors import WeightSyncError


def post(url: str, path: str, payload: Optional[dict] = None, timeout_s: float = 600.0) -> dict:
    try:
        r = requests.post(url + path, json=payload or {}, timeout=timeout_s)
    except requests.RequestException as e:
        raise WeightSyncError(f"{url}{path}: {type(e).__name__}: {e}", [(url, path)]) from e
    try:
        body = r.json()
    except ValueError:
        body = {"message": r.text[:500]}
    if r.status_code != 200 or (isinstance(body, dict) and body.get("success") is False):
        raise WeightSyncError(f"{url}{path}: HTTP {r.status_code}: "
                              f"{body.get('message', body) if isinstance(body, dict) else body}",
                              [(url, path)])
    return body if isinstance(body, dict) else {"body": body}


def get(url: str, path: str, timeout_s: float = 30.0) -> dict:
    r = requests.get(url + path, timeout=timeout_s)
    r.raise_for_status()
    return r.json()


def server_weight_version(url: str) -> Optional[str]:
    return get(url, "/model_info").get("weight_version")


def begin_update(url: str, session: bool = True) -> None:
    """Pause generation, flush the cache; open a weight-update session (``session``)."""
    post(url, "/pause_generation", {"mode": "abort"})
    post(url, "/flush_cache")
    if not session:
        return
    try:
        post(url, "/begin_weight_update")
    except WeightSyncError as e:
        if "already open" not in str(e):
            raise
        # left open by a failed sync: close it and start over
        post(url, "/end_weight_update")
        post(url, "/begin_weight_update")


def end_update(url: str, version: str, session: bool = True) -> None:
    """Close the session (``session``), tag the version, flush (``session``), resume
    generation, verify the version."""
    if session:
        post(url, "/end_weight_update")
    post(url, "/update_weight_version", {"new_version": version, "abort_all_requests": False})
    if session:
        post(url, "/flush_cache")
    post(url, "/continue_generation")
    got = server_weight_version(url)
    if got != version:
        raise WeightSyncError(f"{url} reports weight version {got!r} after syncing {version!r}",
                              [(url, "/update_weight_version")])


def abandon_update(url: str, session: bool = True) -> None:
    """Best effort after a failure: leave the server closed and generating."""
    for path in (("/end_weight_update",) if session else ()) + ("/continue_generation",):
        try:
            post(url, path, timeout_s=30.0)
        except Exception:  # noqa: BLE001 - the server may be gone
            pass
