"""Who may talk to the cluster: the rule for ``--cluster`` addresses and the TLS credentials the driver presents.

A Dask scheduler and its workers unpickle what they are sent, so whoever reaches a plain ``tcp://`` scheduler
port can run code on every host of the cluster. The driver therefore joins a scheduler on another host only
over ``tls://`` (Dask's mutual TLS: the scheduler admits only peers whose certificate its CA signed), unless the
user says ``--insecure-cluster``. Loopback addresses stay allowed: that is where ``--workers`` puts its cluster.

The address rule reads the string only: it never resolves a name (a host name that is not literally
``localhost`` counts as another host) and opens no connection. Dask is imported only by :func:`driver_security`.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from .cluster_spec import ClusterError

log = logging.getLogger("lcm_nodes.cluster")

#: Dask schemes whose connections are encrypted and authenticated (``tls``; ``wss`` is TLS over websockets).
ENCRYPTED_SCHEMES = frozenset({"tls", "wss"})
#: Dask's scheme for an address written without one (``distributed.comm.default-scheme``).
DEFAULT_SCHEME = "tcp"


def split_address(address: str) -> tuple[str, str]:
    """(scheme, host) of a Dask address, by reading the string: ``tls://[::1]:8786`` -> ("tls", "::1").

    No scheme means Dask's default, tcp; an IPv6 host is written in brackets when a port follows.
    """
    scheme, sep, rest = address.strip().partition("://")
    if not sep:
        scheme, rest = DEFAULT_SCHEME, address.strip()
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        host = rest[1:rest.find("]")] if "]" in rest else rest[1:]
    elif rest.count(":") == 1:
        host = rest.split(":", 1)[0]
    else:  # a bare host, or an IPv6 address without brackets (and so without a port)
        host = rest
    return scheme.lower(), host


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is literally this machine: ``localhost``, 127.0.0.0/8 or ::1 (no name is looked up)."""
    host = host.strip().lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone (::1%lo)
    except ValueError:
        return False  # a name: it may resolve anywhere
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_safe_cluster_address(address: str) -> bool:
    """Whether the driver may join ``address`` without ``--insecure-cluster``: an encrypted scheme, or loopback."""
    scheme, host = split_address(address)
    return scheme in ENCRYPTED_SCHEMES or scheme == "inproc" or is_loopback_host(host)


def check_cluster_address(address: str, insecure: bool = False) -> None:
    """Refuse a plain (unencrypted) address of another host unless ``insecure``; raises ClusterError with the fix."""
    if is_safe_cluster_address(address):
        return
    scheme, host = split_address(address)
    if insecure:
        log.warning("joining %s without encryption (--insecure-cluster): whoever can reach that port can run code on "
                    "every host of the cluster", address)
        return
    tls = "tls://" + address.strip().partition("://")[2] if "://" in address else f"tls://{address.strip()}"
    raise ClusterError(f"--cluster {address} is unencrypted {scheme} to another host ({host}), and Dask unpickles what it is "
                       f"sent, so anyone who can reach that port can run code on every host of the cluster; start the scheduler "
                       f"and workers with TLS and give --cluster {tls} with --tls-ca-file, --tls-cert and --tls-key "
                       f"(README, Scale-out), or add --insecure-cluster on a network that only you can reach")


@dataclass(frozen=True)
class TLSFiles:
    """The driver's TLS credentials from the command line (PEM files); None: taken from Dask's configuration
    (``distributed.comm.tls.ca-file``, ``distributed.comm.tls.client.cert`` / ``.key``).

    ca_file: the CA that signed the scheduler's and workers' certificates (and this one).
    cert: this driver's certificate; key: its private key (None: appended to the cert file).
    """

    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def given(self) -> bool:
        return any((self.ca_file, self.cert, self.key))

    def check(self, address: str | None) -> None:
        """Refuse flags that cannot work: without a tls:// address, without a CA or a certificate, or missing files."""
        if not self.given:
            return
        if address is None:
            raise ClusterError("--tls-ca-file, --tls-cert and --tls-key are the driver's credentials for --cluster tls://HOST:PORT; "
                               "--workers needs none (its cluster stays on 127.0.0.1): drop them")
        scheme, _ = split_address(address)
        if scheme not in ENCRYPTED_SCHEMES:
            raise ClusterError(f"--tls-ca-file, --tls-cert and --tls-key are for a TLS scheduler, but --cluster {address} is {scheme}; "
                               f"give --cluster tls://HOST:PORT (the scheduler started with --tls-ca-file/--tls-cert/--tls-key)")
        if not (self.ca_file and self.cert):
            raise ClusterError("TLS needs both --tls-ca-file (the cluster's CA) and --tls-cert (this driver's certificate, "
                               "with --tls-key unless the key is in the same file)")
        for flag, path in (("--tls-ca-file", self.ca_file), ("--tls-cert", self.cert), ("--tls-key", self.key)):
            if path is not None and not Path(path).expanduser().is_file():
                raise ClusterError(f"{flag} {path} does not exist or is not a file; give the PEM file's path")


def driver_security(address: str, files: TLSFiles):
    """The ``distributed.security.Security`` the driver's Client uses for ``address``, or None for a plain address
    (Dask's configuration then applies, as it does for any Client).

    For a tls:// address: from the flags (``require_encryption=True``) when given, else from Dask's configuration;
    raises ClusterError when neither names a CA and a client certificate.
    """
    scheme, _ = split_address(address)
    if scheme not in ENCRYPTED_SCHEMES:
        return None
    from distributed.security import Security

    if files.given:
        given = {"tls_ca_file": files.ca_file, "tls_client_cert": files.cert, "tls_client_key": files.key}
        return Security(require_encryption=True,
                        **{k: str(Path(v).expanduser()) for k, v in given.items() if v is not None})
    security = Security()
    if not (security.tls_ca_file and security.tls_client_cert):
        raise ClusterError(f"--cluster {address} needs this driver's TLS credentials: give --tls-ca-file CA.pem --tls-cert CERT.pem "
                           f"--tls-key KEY.pem, or set distributed.comm.tls.ca-file and distributed.comm.tls.client.cert/.key "
                           f"in Dask's configuration")
    return security
