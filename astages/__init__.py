"""astages: run arq jobs in stages; every job of a stage, retries included, finishes
before the next stage starts, and a finished group cleans up after itself."""

from astages._flow import DEFAULT_WINDOW, FlowLimits, Rate
from astages._keys import DEFAULT_PREFIX
from astages.cleaner import Cleaner, CleanupReport
from astages.exceptions import (
    AstagesError,
    CorruptRecord,
    GroupFinished,
    GroupNotFound,
    InFlightCapReached,
    InvalidJobFunction,
    InvalidJobOption,
    InvalidQueue,
    InvalidSchedule,
    InvalidStageName,
    InvalidStageNumber,
    InvalidStatusMessage,
    JobFailed,
    JobNotFound,
    JobNotPending,
    JobNotRun,
    NotRetryable,
    ResultNotAvailable,
    RetriesExhausted,
    StageComplete,
    StageNotFound,
    StageNotRunning,
)
from astages.group import StagedGroup, within_a_grouping
from astages.job import JobResult, StagedJob
from astages.models import (
    Event,
    FailurePolicy,
    GroupStatus,
    GroupSummary,
    JobInfo,
    JobStatus,
    StageInfo,
    StageProgress,
    StageStatus,
    StageSummary,
)
from astages.runner import HardenedWorker
from astages.stage import StagedGroupStage
from astages.sweeper import Sweeper, SweepReport
from astages.worker import worker_settings

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_WINDOW",
    "AstagesError",
    "Cleaner",
    "CleanupReport",
    "CorruptRecord",
    "Event",
    "FailurePolicy",
    "FlowLimits",
    "GroupFinished",
    "GroupNotFound",
    "GroupStatus",
    "GroupSummary",
    "HardenedWorker",
    "InFlightCapReached",
    "InvalidJobFunction",
    "InvalidJobOption",
    "InvalidQueue",
    "InvalidSchedule",
    "InvalidStageName",
    "InvalidStageNumber",
    "InvalidStatusMessage",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "JobNotPending",
    "JobNotRun",
    "JobResult",
    "JobStatus",
    "NotRetryable",
    "Rate",
    "ResultNotAvailable",
    "RetriesExhausted",
    "StageComplete",
    "StageInfo",
    "StageNotFound",
    "StageNotRunning",
    "StageProgress",
    "StageStatus",
    "StageSummary",
    "StagedGroup",
    "StagedGroupStage",
    "StagedJob",
    "SweepReport",
    "Sweeper",
    "__version__",
    "within_a_grouping",
    "worker_settings",
]
