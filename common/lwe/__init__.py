"""The LWE core: parameter sets, planner, seeded A, encryption, exact mod-q GEMM, wire format.

No grpc imports: every party and every test uses this directly.
"""
