"""Comparison servers for the scale test: same room semantics, no storage, no auth.

* ``socketio_peer``: python-socketio ``AsyncServer`` + ``AsyncRedisManager`` on aiohttp.
* ``channels_peer``: Django Channels consumer + channels_redis, served by uvicorn.
* ``aiohttp_peer``: one aiohttp process, rooms in memory, orjson (the Python ceiling).

All of them: the first request on a chat (``get_history`` / ``join``) joins its room; a
``send_message`` gets one reply to the sender and one push to every other room member.
They persist nothing and check no token.
"""
