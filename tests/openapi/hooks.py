"""Schemathesis hooks for scripts/check-openapi.sh.

OpenAPI cannot state a rule that ties two parameters together, that a time lies in
the future, or that a cursor must come from a previous page. The API states each such
rule in the parameter's description; these filters keep the generated requests the
rule allows, so that "schema-valid request rejected" means a document that says too
little, never one of these. Each filter quotes the description it follows.
(Schemathesis applies them in its fuzzing and stateful phases, not in its coverage
phase: the script runs those.)
"""

from datetime import date, datetime, timedelta, timezone

import schemathesis

EPOCH = date(1970, 1, 1)


def _day(value):
    """A usage window's bound as the server reads it: a date, or a time's day."""
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        return datetime.fromisoformat(value.replace("Z", "+00:00")).date()
    except (TypeError, ValueError):
        return None


def _instant(value):
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return None
    return t if t.tzinfo is not None else None


@schemathesis.hook("filter_query").apply_to(path_regex=r"^/api/v1/usage")
def usage_window(ctx, query):
    # "from 1970"; "to: not before `from`, at most 400 days after" (defaults: the
    # first of this month, today).
    query = query or {}
    today = datetime.now(timezone.utc).date()
    start = _day(query["from"]) if "from" in query else today.replace(day=1)
    end = _day(query["to"]) if "to" in query else today
    if start is None or end is None:
        return True  # not a date at all: a case for the refusal checks
    return EPOCH <= start <= end and (end - start).days < 400


@schemathesis.hook("filter_query").apply_to(path="/api/v1/reservations")
def reservation_window(ctx, query):
    # "from: RFC 3339, from 1970; default: now"; "to: after `from`".
    query = query or {}
    now = datetime.now(timezone.utc)
    start = _instant(query["from"]) if "from" in query else now
    end = _instant(query["to"]) if "to" in query else None
    if start is None or ("to" in query and end is None):
        return True
    if start.year < 1970 or (end is not None and end.year < 1970):
        return False
    return end is None or start < end


@schemathesis.hook("filter_query").apply_to(path_regex=r"^/api/v1/gpus")
def cursor_from_a_page(ctx, query):
    # "`next_cursor` of the previous page": the stateful phase follows the link.
    return "cursor" not in (query or {})


@schemathesis.hook("filter_body").apply_to(path="/api/v1/users/{user}/reservations")
def reservation_in_the_future(ctx, body):
    # "start: RFC 3339", not in the past; "end: after `start`"; at least 15 minutes,
    # at most `[reservations] max_length` (7 days by default) long, starting within
    # `max_lead` (90 days by default).
    if not isinstance(body, dict):
        return True
    start, end = _instant(body.get("start")), _instant(body.get("end"))
    if start is None or end is None:
        return True
    now = datetime.now(timezone.utc)
    return (
        now + timedelta(minutes=1) < start < now + timedelta(days=90)
        and timedelta(minutes=15) <= end - start <= timedelta(days=7)
    )


@schemathesis.hook("filter_query").apply_to(path="/api/v1/users/{user}/servers/{server}/logs")
def logs_without_follow(ctx, query):
    # "follow: keep the response open ... until the server ends": a stream no
    # request of the fuzzer can wait out; the plain read is the same code to its end.
    return not (query or {}).get("follow")


@schemathesis.hook("filter_body").apply_to(path="/api/v1/users/{user}/servers", method="POST")
def cpu_and_memory_together(ctx, body):
    # "Resources: `preset`, or `cpu` and `memory`, or neither".
    if not isinstance(body, dict):
        return True
    given = [body.get(k) is not None for k in ("preset", "cpu", "memory")]
    return given in ([True, False, False], [False, True, True], [False, False, False])
