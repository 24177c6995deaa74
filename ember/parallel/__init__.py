"""How a model is laid out over devices: the mesh (`mesh.py`), data parallelism (`fsdp.py`) and
activation recomputation (`recompute.py`). Tensor, pipeline, context and expert parallelism plug in
here as further mesh dimensions and modules."""
