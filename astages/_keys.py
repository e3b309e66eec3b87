"""Every Redis key name astages uses is built here and nowhere else.

All keys of one group share the hash tag ``{<group id>}``, so each group lives in one
Redis Cluster slot. The Lua scripts derive a group's other keys from its hash key in the
same way (see ``lua/_lib.lua``), so the two must change together.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "astages"


@dataclass(frozen=True, slots=True)
class JobRef:
    """Where a staged job lives, parsed from its arq job id."""

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

    def pattern(self) -> str:
        """SCAN pattern matching every key astages owns under this prefix."""
        return f"{self.prefix}:*"

    def job_id_base(self, group_id: str) -> str:
        return f"{self.prefix}:{group_id}:"

    def job_id(self, group_id: str, number: int, seq: int) -> str:
        """The arq job id of a staged job; it says where the job's record is."""
        return f"{self.prefix}:{group_id}:{number}:{seq}"

    def parse_callback_id(self, job_id: str) -> CallbackRef | None:
        """The callback a job id names (``<prefix>:<group>:cb:<event>:<k>``), or None."""
        head = f"{self.prefix}:"
        if not job_id.startswith(head):
            return None
        parts = job_id[len(head) :].split(":")
        if len(parts) != 4 or parts[1] != "cb":
            return None
        return CallbackRef(parts[0], parts[2], f"{parts[2]}:{parts[3]}")

    def parse_job_id(self, job_id: str) -> JobRef | None:
        """The record a staged job id points at, or None for any other job id."""
        head = f"{self.prefix}:"
        if not job_id.startswith(head):
            return None
        parts = job_id[len(head) :].split(":")
        if len(parts) != 3:
            return None
        group_id, number, seq = parts
        try:
            return JobRef(group_id, int(number), int(seq))
        except ValueError:
            return None
