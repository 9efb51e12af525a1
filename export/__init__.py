"""ONNX export with KV-cache I/O (see DESIGN.md, "ONNX graph" and "Artifact folder")."""

from neodeploy.export.pipeline import PRECISIONS, export

__all__ = ["export", "PRECISIONS"]
