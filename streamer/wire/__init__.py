"""What crosses a socket: the messages and their codec (``protocol``), socket creation and limits (``sockets``),
CurveZMQ keys and roles (``security``), and the clients subscribers use (``client``: ``Subscriber``, ``Controller``).

Imports numpy, zmq and pydantic only — nothing else of this project (docs/architecture.md), so a subscriber or a
producer needs neither the encoder nor the service.
"""
