"""The fault harness (`nox -s chaos`): a seeded storm of misbehaving clients against a
proxy in front of a misbehaving upstream, then checks from outside (issue 17)."""
