"""Shared plumbing: configuration, logging, gRPC server/channel factories, TLS, and the LWE core."""
