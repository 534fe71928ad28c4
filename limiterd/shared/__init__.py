"""The shared ledger on Redis: many sidecars, one budget per key.

    keys.py     the key layout (one hash tag per scope x model, so it runs on Cluster)
    scripts.py  the Lua scripts in lua/, loaded once and called by hash
    settings.py which Redis, and what to do when it is away
    engine.py   the async engine that sidecars run against Redis instead of the local ledger
"""
