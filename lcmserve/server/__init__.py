"""REST and gRPC servers over the engine, with Prometheus metrics."""
