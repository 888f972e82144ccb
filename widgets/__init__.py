"""Dendrite's Jupyter views: the tree explorer and the memory/latency dashboards.

Views read the package's public objects and DataFrames (``tree.to_frame()``, telemetry
frames, benchmark dicts) and hold no engine logic of their own.
"""

from widgets.explorer import TreeExplorer, TreeExport
from widgets.layout import edge_coords, layout_frame

__all__ = ["TreeExplorer", "TreeExport", "edge_coords", "layout_frame"]
