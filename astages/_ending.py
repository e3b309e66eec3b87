"""The CLI's name for a confirmed subscription to a group's end (``group.ending()``)."""

from astages.group import GroupEnding as EndListener

__all__ = ["EndListener"]
