"""fedfhe-certs and fedfhe-keygen: a federation's PKI, and the hospitals' consortium update key.

    fedfhe-certs DIR --workers hospital-1,hospital-2,hospital-3 [--hosts localhost,127.0.0.1]
    fedfhe-keygen FILE

Private keys are written 0600; nothing secret is ever taken from the command line.
The consortium key is for the hospitals only: never copy it to the coordinator
or the FHE node (they get its public check value, which fedfhe-keygen prints).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.tls import SERVER, TlsError, check_name, create_ca, issue
from common.updates import ConsortiumKey, KeyFileError, write_key_file


def make_federation_pki(directory: Path, workers: Sequence[str], hosts: Sequence[str],
                        *, operator: bool = True, force: bool = False) -> list[Path]:
    ca = create_ca(directory, force=force)
    made = [issue(ca, directory, SERVER, role="service", hosts=list(hosts))]
    # Services that call other services (worker → node, coordinator) present this identity.
    made.append(issue(ca, directory, "service-client", role="service"))
    made += [issue(ca, directory, w, role="worker") for w in workers]
    if operator:
        made.append(issue(ca, directory, "operator", role="operator"))
    return made


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfhe-certs", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--workers", default="hospital-1,hospital-2,hospital-3",
                        help="comma-separated worker names (one client certificate each)")
    parser.add_argument("--hosts", default="localhost,127.0.0.1,::1",
                        help="names and addresses the services are reached at (certificate SANs)")
    parser.add_argument("--no-operator", action="store_true", help="skip the operator certificate")
    parser.add_argument("--force", action="store_true", help="replace an existing CA")
    args = parser.parse_args(argv)
    workers = [w for w in args.workers.split(",") if w]
    try:
        for w in workers:
            check_name(w)
        made = make_federation_pki(args.directory, workers, [h for h in args.hosts.split(",") if h],
                                   operator=not args.no_operator, force=args.force)
    except TlsError as exc:
        print(f"fedfhe-certs: {exc}", file=sys.stderr)
        return 2
    print(f"wrote CA and {len(made)} certificates to {args.directory}")
    return 0


def keygen_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfhe-keygen", description="make the consortium update key file (0600)")
    parser.add_argument("file", type=Path, help="where to write the key (refuses to replace one)")
    parser.add_argument("--force", action="store_true", help="replace an existing key file")
    args = parser.parse_args(argv)
    key = ConsortiumKey.generate()
    try:
        write_key_file(args.file, key, force=args.force)
    except KeyFileError as exc:
        print(f"fedfhe-keygen: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.file} (0600); public check value {key.check_value().hex()} "
          f"(pass it to fedfhe-coordinator --key-check-value)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
