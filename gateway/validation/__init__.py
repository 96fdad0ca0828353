"""What a request must be before anything is charged or sent: a bounded head, a body read once and checked.

Open `middleware.py` first (`BodyMiddleware`): it reads a hot route's JSON body within a
size and depth bound, refuses a body not declared as JSON (415), and validates it
(`validate.py`) against its operation's schema (`chat.py`, `endpoints.py`, sharing
`fields.py`) before leaving it on the request context for every later layer.
`head.py` (`HeadLimitMiddleware`) answers 431 for an oversized request head, before auth;
`protocol.py` stops one under uvicorn while it still arrives.
"""
