"""Structure removal: the dependency graph of a traced model, and the physical removal of channels
that rebuilds a smaller dense network (``sparsenet.shrink``)."""
from .graph import DependencyGraph, Group, Member, build_graph
from .api import GroupRow, ShrinkReport, shrink

__all__ = ["DependencyGraph", "Group", "Member", "build_graph", "shrink", "ShrinkReport", "GroupRow"]
