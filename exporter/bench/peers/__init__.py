"""`make bench-peers`: the engines users would pick instead, on the same weights (see __main__).
Peer code lives here and in the peer venv under build/cache/peers/; runtime/ never imports it,
and no fetched peer source is committed."""
