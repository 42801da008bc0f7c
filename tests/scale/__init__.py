"""Load-test harness for the chat gateway (``make scale-test``).

Modules: ``loadgen`` (open-loop WebSocket load generator, one process per core it is
given), ``harness`` (starts the system under test or a peer stack, drives the load
generators, verifies and reports), ``peers`` (python-socketio, Django Channels and a bare
aiohttp server speaking the same room semantics, for comparison).
"""
