"""Authentication: the decision model and the authenticators that produce decisions.

`model` holds the plain data (credentials, client facts, decisions, the `Authenticator`
protocol); `http` asks an nginx-compatible auth_http service.
"""
