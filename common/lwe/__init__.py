"""The LWE core: parameter sets, planner, seeded public matrix, encryption, exact mod-q GEMM, wire format. No grpc imports."""
