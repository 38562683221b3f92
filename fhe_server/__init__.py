"""The FHE compute node: serves public int8 base weights and evaluates W·B on LWE ciphertexts."""
