"""arq compatibility: what a plain arq user sees is arq's behaviour (issue 10, items 11, 12, 14).

A job's ``ctx['redis']`` is arq's pool as the user configured it (no retry policy of
astages': a job's own command whose reply is lost is not sent again), while astages' own
idempotent calls still survive dropped connections; ``HardenedWorker`` survives Redis
connectivity loss and nothing else (a hook that raises, a wrong password or a TLS
failure stops it, as it stops arq's Worker); astages' exceptions survive arq's pickling.
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus
from helpers import run_burst

import astages
import astages.exceptions
from astages.exceptions import AstagesError, CorruptRecord

# ---------------------------------------------------------------------------------------
# Defect 14: every astages error pickles (arq stores a failed job's exception pickled)


def _sample(param: inspect.Parameter) -> Any:
    """A plausible argument for an exception's ``__init__`` parameter."""
    annotation = str(param.annotation)
    if "int" in annotation:
        return 7
    if "float" in annotation:
        return 1.5
    return f"<{param.name}>"


def _instance(cls: type[AstagesError]) -> AstagesError:
    if cls.__init__ is AstagesError.__init__:
        return cls("a message", 2)
    params = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    return cls(*[_sample(p) for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


ERRORS = [
    getattr(astages.exceptions, name)
    for name in astages.exceptions.__all__
    if isinstance(getattr(astages.exceptions, name), type)
    and issubclass(getattr(astages.exceptions, name), AstagesError)
]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_round_trips_through_pickle(cls: type[AstagesError]):
    """Every class in astages.exceptions unpickles to the same type, message, args and attributes."""
    error = _instance(cls)
    error.add_note("a note")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error) and copy.args == error.args
    assert copy.__dict__ == error.__dict__


async def fails_corrupt(ctx: dict[str, Any], key: str) -> None:
    raise CorruptRecord(key, "made up by the test")


async def test_arq_result_of_a_job_failed_with_an_astages_error_deserializes(real_redis: ArqRedis):
    """arq's result of a plain and of a staged job that raised CorruptRecord reads back as that error."""
    plain = await real_redis.enqueue_job("fails_corrupt", "plain:key")
    assert plain is not None
    async with astages.within_a_grouping(real_redis, "pickled") as group:
        staged = await (await group.stage(1)).enqueue(fails_corrupt, "staged:key")
    await run_burst(real_redis, [fails_corrupt])
    for job_id, key in ((plain.job_id, "plain:key"), (staged.id, "staged:key")):
        info = await Job(job_id, real_redis).result_info()
        assert info is not None and not info.success
        assert isinstance(info.result, CorruptRecord)
        assert (info.result.key, info.result.detail) == (key, "made up by the test")
        assert await Job(job_id, real_redis).status() == JobStatus.complete
