"""Every Redis key name astages uses is built here and nowhere else.

All keys of one group share the hash tag ``{<group id>}``, so each group lives in one
Redis Cluster slot. The Lua scripts derive a group's other keys from its hash key in the
same way (see ``lua/_lib.lua``), so the two must change together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_PREFIX = "astages"

# A staged job's seq is zero-padded to this width in its arq id, so ids of one stage sort
# as strings in enqueue order: arq takes jobs of equal score (a chunk shares one) in the
# string order of their ids. lua/_lib.lua's job_id() pads the same way.
SEQ_WIDTH = 10

# The id shapes astages makes: "<group>:<stage>:<seq>" and "<group>:cb:<event>:<k>" after
# "<prefix>:", where a group id is 32 lowercase hex digits (group.new_group_id). Anything
# else is a plain arq job, however much it looks like one of ours.
_GROUP = r"(?P<group>[0-9a-f]{32})"
_INT = r"(?:0|-?[1-9][0-9]*)"
_JOB_TAIL = re.compile(_GROUP + rf":(?P<stage>{_INT}):(?P<seq>[0-9]{{{SEQ_WIDTH}}}|[1-9][0-9]{{{SEQ_WIDTH},}})")
_CALLBACK_TAIL = re.compile(_GROUP + rf":cb:(?P<event>complete|success|failure|stage\.{_INT}):(?P<k>[1-9][0-9]*)")


class JobRef(NamedTuple):
    """Where a staged job lives, parsed from its arq job id (a named tuple: one is made
    per job a worker runs)."""

    group_id: str
    stage: int
    seq: int


@dataclass(frozen=True, slots=True)
class CallbackRef:
    """A callback job of a group, parsed from its arq job id."""

    group_id: str
    event: str  # complete, success, failure or stage.<n>
    field: str  # "<event>:<k>"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one key prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def index(self) -> str:
        """Sorted set of every live group id, scored by creation time (ms)."""
        return f"{self.prefix}:groups"

    def group(self, group_id: str) -> str:
        return f"{self.prefix}:{{{group_id}}}"

    def stages(self, group_id: str) -> str:
        return f"{self.group(group_id)}:stages"

    def stage(self, group_id: str, number: int) -> str:
        return f"{self.group(group_id)}:s:{number}"

    def stage_part(self, group_id: str, number: int, part: str) -> str:
        """``part`` is one of jobs, spec, open, done, msg, err."""
        return f"{self.stage(group_id, number)}:{part}"

    def callbacks(self, group_id: str) -> str:
        return f"{self.group(group_id)}:callbacks"

    def events(self, group_id: str) -> str:
        return f"{self.group(group_id)}:events"

    def summary(self, group_id: str, event: str) -> str:
        """The summary callbacks of ``event`` receive (kept beside the group, expiring)."""
        return f"{self.group(group_id)}:summary:{event}"

    def finished_channel(self, group_id: str) -> str:
        """Pub/sub channel on which a group's end is announced (its summary as JSON)."""
        return f"{self.job_id_base(group_id)}finished"

    def reply(self, token: str) -> str:
        """The reply of one call, kept a short while so that the call re-sent after its
        reply was lost gets it back instead of acting again (see once() in _lib.lua)."""
        return f"{self.prefix}:reply:{token}"

    @property
    def totals(self) -> str:
        """Hash of the jobs (successful, failed, cancelled, retried) of every group that
        ended or was deleted, added once per group as it goes (see lua/_lib.lua)."""
        return f"{self.prefix}:totals"

    @property
    def series(self) -> str:
        """Capped stream of cumulative job counts, one sample per sweeper pass (astages.ops)."""
        return f"{self.prefix}:series"

    def pattern(self) -> str:
        """SCAN pattern matching every key astages owns under this prefix."""
        return f"{self.prefix}:*"

    def job_id_base(self, group_id: str) -> str:
        return f"{self.prefix}:{group_id}:"

    def job_id(self, group_id: str, number: int, seq: int) -> str:
        """The arq job id of a staged job; it says where the job's record is. The seq is
        zero-padded (``SEQ_WIDTH``) so string order is enqueue order."""
        return f"{self.prefix}:{group_id}:{number}:{seq:0{SEQ_WIDTH}d}"

    def parse_callback_id(self, job_id: str) -> CallbackRef | None:
        """The callback a job id names (``<prefix>:<group>:cb:<event>:<k>``, exactly as
        astages makes it), or None."""
        head = f"{self.prefix}:"
        if not job_id.startswith(head):
            return None
        m = _CALLBACK_TAIL.fullmatch(job_id, len(head))
        if m is None:
            return None
        return CallbackRef(m["group"], m["event"], f"{m['event']}:{m['k']}")

    def parse_job_id(self, job_id: str) -> JobRef | None:
        """The record a staged job id points at (``<prefix>:<group>:<stage>:<seq>``,
        exactly as ``job_id`` makes it), or None for any other job id."""
        head = len(self.prefix) + 1
        if job_id[head - 1 : head] != ":" or not job_id.startswith(self.prefix):
            return None
        m = _JOB_TAIL.fullmatch(job_id, head)
        if m is None:
            return None
        group, stage, seq = m.groups()
        return JobRef(group, int(stage), int(seq))
