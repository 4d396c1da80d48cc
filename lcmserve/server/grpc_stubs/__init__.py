"""gRPC stubs generated from proto/lcmserve.proto by scripts/grpc_stubs.py; do not edit them by hand."""
