"""The Gateway's HTTP layer: ingress, routes, authentication, the own listener."""
