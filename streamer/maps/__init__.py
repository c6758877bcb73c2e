"""Frame → maps with no sockets and no threads: ``preprocess``, ``tiling``, ``spectral``, ``atoms`` (what training
and serving both cut patches with, on numpy arrays or torch tensors alike through ``arrays``: numpy on the CPU, with
no torch needed, torch on a GPU), ``manifest`` and ``encoder`` (the artifact, ONNX Runtime or TorchScript),
``defects`` and ``novelty`` (the defect score and regions), and ``pipeline`` (``Pipeline.process``, the reference the
live service reproduces).

Never imports ``streamer.service``; of ``streamer.wire`` only the message types (docs/architecture.md).
"""
