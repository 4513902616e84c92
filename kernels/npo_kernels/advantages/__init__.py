"""Group-relative advantages (GRPO / Dr.GRPO / RLOO) over arbitrary, possibly mixed-policy groups."""

from .op import group_advantages
from .reference import group_advantages_ref

__all__ = ["group_advantages", "group_advantages_ref"]
