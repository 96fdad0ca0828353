"""Who is calling: API keys and JWT bearer tokens, checked before the body is read.

Open `middleware.py` first (`AuthMiddleware`: the credential, the policy it maps to).
`keys.py` keeps the hashed API keys of every replica in step through the store;
`jwt.py` verifies tokens against configured issuers, `jwks.py` loads their keys.
"""
