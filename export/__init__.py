"""ONNX export with KV-cache I/O (see DESIGN.md, "ONNX graph" and "Artifact folder")."""
