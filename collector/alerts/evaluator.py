"""The state machine of one (rule, series), driven by readings in event-time order.

Levels: ``ok``; ``pending`` (the condition holds, for less than the rule's ``for``);
``firing``; ``resolving`` (firing, the condition stopped holding less than
``keep_firing_for`` ago). Raising and clearing happen at the time of the reading that decides
them, whenever that reading arrives: a backlog delivered hours late raises and clears at the
times things really happened.

Readings are evaluated in timestamp order. A reading at or before the state's last evaluated
time (out of order: two collectors committed a gateway's consecutive batches the other way
round, or a batch was resent after later ones were committed) cannot be stepped onto the state.
Instead the state is rewound to a *checkpoint* before it and every stored reading after the
checkpoint is evaluated again in order, which gives exactly the result in-order delivery would
have given. A checkpoint is a time at which the state is known from the open alert alone
(``firing`` if one is open, else ``ok``, nothing pending): each transition, and a reading that
left the state quiet ``REWIND_SPAN_US`` after the previous checkpoint; the last
``CHECKPOINTS`` are kept. Transitions already published after the checkpoint are never taken
back: when the re-evaluation starts with exactly them, only the transitions after them are
new; when it would differ (the late reading changes a published transition), the late
readings are counted as ``skipped`` and the state goes on from where it was.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from collector.alerts.rules import CONDITIONS, Rule

Level = Literal["ok", "pending", "firing", "resolving"]
Reading = tuple[int, float]  # (time in µs since the epoch, value)

# A quiet state makes a checkpoint when the newest one is this far behind (µs): a rewind then
# reads about this much of a series' history per checkpoint it goes back.
REWIND_SPAN_US = 600 * 1_000_000
CHECKPOINTS = 8
CHUNK = 64  # readings checked at once for "nothing can change"
Checkpoint = tuple[int, int | None]  # (time, the open alert's raised_at or None)


@dataclass(frozen=True, slots=True)
class Transition:
    """An alert raised or cleared at ``time`` (the deciding reading's time)."""

    kind: Literal["raised", "cleared"]
    time: int
    value: float | None
    raised_at: int  # the alert's key with the rule and series
    reason: str = ""  # why it cleared, or "no_data" for a silence


@dataclass(slots=True)
class State:
    """What is kept per (rule, series) between batches."""

    digest: str
    level: Level = "ok"
    since: int | None = None  # start of pending / resolving
    last_time: int | None = None  # the newest reading evaluated
    last_value: float | None = None
    raised_at: int | None = None  # the open alert's time
    evaluated: int = 0
    skipped: int = 0
    checkpoints: list[Checkpoint] = field(default_factory=list)  # oldest first

    @property
    def anchor(self) -> int | None:
        """The newest checkpoint's time."""
        return self.checkpoints[-1][0] if self.checkpoints else None

    def mark(self, t: int) -> None:
        """Record a checkpoint at ``t`` (the state is quiet there)."""
        self.checkpoints.append((t, self.raised_at))
        del self.checkpoints[:-CHECKPOINTS]

    def copy(self) -> State:
        """An independent copy."""
        return State(
            self.digest,
            self.level,
            self.since,
            self.last_time,
            self.last_value,
            self.raised_at,
            self.evaluated,
            self.skipped,
            list(self.checkpoints),
        )

    def quiet(self) -> bool:
        """Nothing pending or resolving: the state follows from ``raised_at`` alone."""
        return self.level in ("ok", "firing")


@dataclass(slots=True)
class Outcome:
    """What one batch of readings did; ``rewind_from`` set: call :func:`rewind` with history."""

    transitions: list[Transition] = field(default_factory=list)
    rewind_from: int | None = None
    late: list[Reading] = field(default_factory=list)
    newer: list[Reading] = field(default_factory=list)


def _raise(state: State, t: int, value: float | None, out: list[Transition], reason: str) -> None:
    state.level, state.since, state.raised_at = "firing", None, t
    state.mark(t)
    out.append(Transition("raised", t, value, t, reason))


def _clear(state: State, t: int, value: float | None, out: list[Transition], reason: str) -> None:
    raised = state.raised_at if state.raised_at is not None else t
    state.level, state.since, state.raised_at = "ok", None, None
    state.mark(t)
    out.append(Transition("cleared", t, value, raised, reason))


def step(rule: Rule, state: State, t: int, value: float, out: list[Transition]) -> None:
    """Evaluate one reading newer than ``state.last_time``."""
    if rule.no_data_us is not None:
        if state.level == "firing":
            assert state.raised_at is not None
            _clear(state, max(t, state.raised_at), value, out, "data")
        elif state.last_time is not None and t - state.last_time > rule.no_data_us:
            # A silence found in a backlog: it started and ended in the past.
            _raise(state, state.last_time + rule.no_data_us, None, out, "no_data")
            _clear(state, t, value, out, "data")
    else:
        level = state.level
        if level == "ok":
            if rule.breaches(value):
                if rule.for_us == 0:
                    _raise(state, t, value, out, "threshold")
                else:
                    state.level, state.since = "pending", t
        elif level == "pending":
            if not rule.breaches(value):
                state.level, state.since = "ok", None
            elif state.since is not None and t - state.since >= rule.for_us:
                _raise(state, t, value, out, "threshold")
        elif level == "firing":
            if not rule.holds(value):
                if rule.keep_firing_for_us == 0:
                    _clear(state, t, value, out, "threshold")
                else:
                    state.level, state.since = "resolving", t
        elif rule.holds(value):
            state.level, state.since = "firing", None
        elif state.since is not None and t - state.since >= rule.keep_firing_for_us:
            _clear(state, t, value, out, "threshold")
    state.last_time, state.last_value = t, value
    checkpoints = state.checkpoints
    if not checkpoints:
        # The state right before the first reading is known: ok.
        checkpoints.append((t - 1, None))
    elif t - checkpoints[-1][0] > REWIND_SPAN_US and state.level in ("ok", "firing"):
        state.mark(t)


def changed_rule(rule: Rule, state: State) -> None:
    """Apply an edit of the rule's condition: pending/resolving timers restart, alerts stay.

    An open alert stays open and is judged by the new condition from the next reading on; a
    pending period restarts. Nothing before the edit is evaluated again under the new rule.
    """
    if state.digest == rule.digest:
        return
    state.digest = rule.digest
    state.level = "firing" if state.raised_at is not None else "ok"
    state.since = None
    if state.last_time is not None:
        # Nothing before the edit is evaluated again under the new rule.
        state.checkpoints = [(state.last_time, state.raised_at)]


def evaluate(rule: Rule, state: State, readings: Iterable[Reading]) -> Outcome:
    """Evaluate a batch of readings of the series (any order) onto ``state``."""
    ordered = sorted(readings)
    return evaluate_columns(rule, state, [t for t, _ in ordered], [v for _, v in ordered])


def evaluate_columns(
    rule: Rule,
    state: State,
    times: list[int],
    values: list[float],
    pre: tuple[Bounds, list[Bounds]] | None = None,
) -> Outcome:
    """:func:`evaluate` on readings as two columns, ``times`` in ascending order; ``pre`` their
    :func:`chunk_bounds` when known."""
    changed_rule(rule, state)
    outcome = Outcome()
    state.evaluated += len(times)
    last = state.last_time
    if last is not None and times and times[0] <= last:
        n = bisect.bisect_right(times, last)
        late = list(zip(times[:n], values[:n], strict=True))
        newer = list(zip(times[n:], values[n:], strict=True))
        first = times[0]
        start = [c for c in state.checkpoints if c[0] < first]
        if start and rule.no_data_us is None:
            # The caller re-reads the stored readings after it (these included): rewind().
            outcome.rewind_from = start[-1][0]
            outcome.late, outcome.newer = late, newer
            return outcome
        state.skipped += n
        times, values, pre = times[n:], values[n:], None
    # Stretches that cannot change the level are applied a chunk at a time (C-level min/max);
    # the others, reading by reading.
    out = outcome.transitions
    n = len(times)
    if pre is None or len(pre[1]) != (n + CHUNK - 1) // CHUNK:
        pre = chunk_bounds(values)
    whole, parts = pre
    if n > CHUNK and _quiet_through(rule, state, times, values, 0, n, whole):
        return outcome
    for c, part in enumerate(parts):
        i = c * CHUNK
        j = min(i + CHUNK, n)
        if not _quiet_through(rule, state, times, values, i, j, part):
            for k in range(i, j):
                step(rule, state, times[k], values[k], out)
    return outcome


Bounds = tuple[float, float] | None  # (min, max) of readings; None: a NaN or infinity among them


def _bounds(values: Sequence[float]) -> Bounds:
    if not values or not math.isfinite(sum(values)):
        return None
    return (min(values), max(values))


def chunk_bounds(values: Sequence[float]) -> tuple[Bounds, list[Bounds]]:
    """The bounds of all ``values`` and of each chunk of ``CHUNK``: computed once per series
    and shared by the rules on it."""
    parts = [_bounds(values[i : i + CHUNK]) for i in range(0, len(values), CHUNK)]
    if not parts or any(p is None for p in parts):
        return None, parts
    return (min(p[0] for p in parts if p), max(p[1] for p in parts if p)), parts


def _quiet_through(
    rule: Rule, state: State, times: list[int], values: list[float], i: int, j: int, b: Bounds
) -> bool:
    """Apply readings ``i:j`` at once when none of them can change the level (the common case:
    an ok series staying ok, a firing one staying firing); what :func:`step` would do, without
    a Python step per reading. False: nothing was applied."""
    if b is None or rule.no_data_us is not None or state.last_time is None:
        return False  # NaN and infinities are read one by one
    if state.level == "ok":
        limit, keep = rule.threshold, False  # no reading may breach
    elif state.level == "firing":
        limit, keep = rule.clear_threshold, True  # every reading must hold
    else:
        return False
    cond = rule.condition
    lo, hi = b
    if cond in (">", ">="):
        edge = lo if keep else hi
    elif cond in ("<", "<="):
        edge = hi if keep else lo
    else:
        return False
    if keep != (CONDITIONS[cond](edge, limit)):
        return False
    anchor = state.anchor
    last = times[j - 1]
    if anchor is not None and last - anchor > REWIND_SPAN_US:
        for t in times[i:j]:
            if t - anchor > REWIND_SPAN_US:
                state.mark(t)
                anchor = t
    state.last_time, state.last_value = last, values[j - 1]
    return True


def rewind(
    rule: Rule,
    state: State,
    outcome: Outcome,
    history: Sequence[Reading],
    published: Sequence[tuple[str, int]],
) -> list[Transition]:
    """Evaluate again from the checkpoint ``outcome.rewind_from`` over ``history`` (the stored
    readings after it, in order); ``published`` are the (kind, time) transitions already
    emitted after it. Returns the new transitions."""
    start = outcome.rewind_from
    assert start is not None
    kept = state.copy()
    checkpoints = [c for c in state.checkpoints if c[0] <= start]
    raised_at = checkpoints[-1][1]
    state.checkpoints = checkpoints
    state.raised_at = raised_at
    state.level = "firing" if raised_at is not None else "ok"
    state.since = None
    state.last_time = start
    out: list[Transition] = []
    for t, value in history:
        if t <= state.last_time:
            continue  # at or before the checkpoint, or the same time stored twice
        step(rule, state, t, value, out)
    again = [(x.kind, x.time) for x in out[: len(published)]]
    if again == list(published):
        return out[len(published) :]
    # The late readings would change what was published: keep it, go on from where it was.
    state.digest, state.level, state.since = kept.digest, kept.level, kept.since
    state.last_time, state.last_value, state.raised_at = (
        kept.last_time,
        kept.last_value,
        kept.raised_at,
    )
    state.checkpoints = kept.checkpoints
    state.skipped += len(outcome.late)
    out = []
    for t, value in outcome.newer:
        step(rule, state, t, value, out)
    return out


def silence(rule: Rule, state: State, now: int) -> list[Transition]:
    """A no-data rule's check against the clock: raise when the series is silent too long."""
    if rule.no_data_us is None or state.last_time is None or state.level == "firing":
        return []
    if now - state.last_time <= rule.no_data_us:
        return []
    out: list[Transition] = []
    _raise(state, state.last_time + rule.no_data_us, None, out, "no_data")
    return out
