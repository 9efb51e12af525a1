"""ONNX export with KV-cache I/O. The graph's inputs and outputs are named by `graph.input_names` /
`graph.output_names`; the artifact folder it writes is described by its manifest (`neodeploy.core.manifest`).

`export` is imported on first use: the TensorRT and lint modules of this package must not pull in torch.
"""

__all__ = ["export", "ExportOptions", "PRECISIONS"]


def __getattr__(name: str):
    if name in __all__:
        from neodeploy.export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'neodeploy.export' has no attribute {name!r}")
