"""The state machine of one (rule, series), driven by readings in event-time order.

Levels: ``ok``; ``pending`` (the condition holds, for less than the rule's ``for``);
``firing``; ``resolving`` (firing, the condition stopped holding less than
``keep_firing_for`` ago). Raising and clearing happen at the time of the reading that decides
them, whenever that reading arrives: a backlog delivered hours late raises and clears at the
times things really happened.

Readings are evaluated in timestamp order. A reading at or before the state's last evaluated
time (out of order: two collectors committed a gateway's consecutive batches the other way
round, or a batch was resent after later ones were committed) cannot be stepped onto the state.
Instead the state is rewound to its *anchor* and every stored reading after the anchor is
evaluated again in order, which gives exactly the result in-order delivery would have given.
The anchor is a time at which the state is known from ``raised_at`` alone (``firing`` if an
alert is open, else ``ok``, nothing pending): the last transition, or a later reading that left
the state quiet. No transition is ever emitted after the anchor before the rewind, so a rewind
emits only new transitions and never takes one back. Readings at or before the anchor are
counted as ``skipped``: they would change transitions already published.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from collector.alerts.rules import Rule

Level = Literal["ok", "pending", "firing", "resolving"]
Reading = tuple[int, float]  # (time in µs since the epoch, value)

# The anchor follows a quiet state forward once it is this far behind (µs): a rewind then
# reads at most about this much of a series' history. Out-of-order readings older than the
# anchor are skipped (counted), so this is also how late an out-of-order reading may be.
REWIND_SPAN_US = 600 * 1_000_000


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
    anchor: int | None = None  # see the module's docstring
    raised_at: int | None = None  # the open alert's time
    evaluated: int = 0
    skipped: int = 0

    def quiet(self) -> bool:
        """Nothing pending or resolving: the state follows from ``raised_at`` alone."""
        return self.level in ("ok", "firing")


@dataclass(slots=True)
class Outcome:
    """What one batch of readings did; ``rewind_from`` set: call :func:`rewind` with history."""

    transitions: list[Transition] = field(default_factory=list)
    rewind_from: int | None = None


def _raise(state: State, t: int, value: float | None, out: list[Transition], reason: str) -> None:
    state.level, state.since, state.raised_at, state.anchor = "firing", None, t, t
    out.append(Transition("raised", t, value, t, reason))


def _clear(state: State, t: int, value: float | None, out: list[Transition], reason: str) -> None:
    raised = state.raised_at if state.raised_at is not None else t
    state.level, state.since, state.raised_at, state.anchor = "ok", None, None, t
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
    if state.anchor is None:
        # The state right before the first reading is known: ok.
        state.anchor = t - 1
    elif state.quiet() and t - state.anchor > REWIND_SPAN_US:
        state.anchor = t


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
        state.anchor = state.last_time


def evaluate(rule: Rule, state: State, readings: Iterable[Reading]) -> Outcome:
    """Evaluate a batch of readings of the series (any order) onto ``state``."""
    changed_rule(rule, state)
    ordered = sorted(readings)
    outcome = Outcome()
    state.evaluated += len(ordered)
    last = state.last_time
    if last is not None and ordered and ordered[0][0] <= last:
        late = [r for r in ordered if r[0] <= last]
        usable = [r for r in late if state.anchor is None or r[0] > state.anchor]
        state.skipped += len(late) - len(usable)
        if usable and rule.no_data_us is None:
            # The caller re-reads the stored readings after the anchor (these included).
            outcome.rewind_from = state.anchor
            return outcome
        ordered = ordered[len(late) :]
    for t, value in ordered:
        step(rule, state, t, value, outcome.transitions)
    return outcome


def rewind(rule: Rule, state: State, history: Sequence[Reading]) -> list[Transition]:
    """Evaluate again, from the anchor, every stored reading after it (``history``, in order)."""
    anchor = state.anchor
    state.level = "firing" if state.raised_at is not None else "ok"
    state.since = None
    if anchor is not None:
        state.last_time = anchor
    out: list[Transition] = []
    for t, value in history:
        if state.last_time is not None and t <= state.last_time:
            continue  # at or before the anchor, or the same time stored twice
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
