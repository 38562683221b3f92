"""fedfhe.v1: generated with grpcio-tools by scripts/gen_protos.sh; do not edit."""
