"""The live runtime: the facade ``Service`` (``facade``), the I/O loop that alone owns the sockets (``io_loop``), the
queue, batching and encoding (``frame_queue``, ``batching``, ``encode_stage``), loading models (``model_loader``),
the accounting (``ledger``), publishing (``publisher``), metrics and the configuration (``config``).

Deliberately empty: ``streamer.service.config`` is imported by ``atomstream serve --help``, which must not pay for
torch; import ``Service`` from ``streamer.service.facade``.
"""
