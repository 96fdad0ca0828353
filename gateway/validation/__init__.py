"""What a request must be before anything is charged or sent: its body read once, bounded and checked.

Open `middleware.py` (`BodyMiddleware`): it reads a hot route's JSON body within a
size and depth bound and leaves it on the request context for every later layer.
"""
