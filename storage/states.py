"""The states a series and a job go through, one enum each (procrastinate's ``Status`` habit).

They are ``StrEnum``s: stored as their lower-case value, compared with and printed as plain
strings, so templates, logs and ``--state`` arguments read the same words as the database.
"""

from __future__ import annotations

from enum import StrEnum


class SeriesState(StrEnum):
    """Where a received series stands.

    ``receiving`` -> ``queued`` (selected for analysis) -> ``analyzed`` | ``rejected`` (the
    engine cannot read it) | ``failed`` (every attempt failed); or ``receiving`` ->
    ``not_selected`` (selection preferred another series, or the rules exclude it). A settled
    series whose images retention deleted is ``purged``. A new instance sets any of them back
    to ``receiving``.
    """

    RECEIVING = "receiving"
    QUEUED = "queued"
    ANALYZED = "analyzed"
    NOT_SELECTED = "not_selected"
    REJECTED = "rejected"
    FAILED = "failed"
    PURGED = "purged"


#: Series states after which a series' images are no longer needed once its results are out.
SETTLED = (SeriesState.ANALYZED, SeriesState.NOT_SELECTED, SeriesState.REJECTED)
#: Series states that mean "this series of the study is (being) analyzed".
CHOSEN = (SeriesState.QUEUED, SeriesState.ANALYZED)


class JobKind(StrEnum):
    ANALYZE = "analyze"
    DELIVER = "deliver"


class JobState(StrEnum):
    """``queued`` -> ``running`` -> ``done`` | ``failed`` (dead letter, with the last error), or
    back to ``queued`` for a retry; ``cancelled`` when withdrawn before it started."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Job states with nothing more to do; an operator may queue such a job again.
FINISHED = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
