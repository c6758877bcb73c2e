"""The offline half's last step: a trained run becomes an artifact (TorchScript, ONNX, manifest) with proven parity.

``exporters.export`` writes the files, ``exporters.verify`` measures parity against the Pyro guide's posterior means,
``exporters.triton`` lays out an NVIDIA Triton model repository. Serving reads the result with
``streamer.maps.encoder``.
"""
