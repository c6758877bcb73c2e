"""The live runtime: the facade ``Service`` (``facade``), the I/O loop that alone owns the sockets and the one context
object it is given (``io_loop``), the model slot that alone holds the pipeline being served (``model_slot``), the
queue, the batching worker and the encoder thread with its batch buffers (``frame_queue``, ``batching``,
``encode_stage``, ``batch_buffers``), loading models (``model_loader``), the accounting (``ledger``), publishing
(``publisher``), metrics and the configuration (``config``).

Deliberately empty: ``streamer.service.config`` is imported by ``atomstream serve --help``, which must not pay for
torch; import ``Service`` from ``streamer.service.facade``.
"""
