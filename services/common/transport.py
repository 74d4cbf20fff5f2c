"""How a service talks on the wire: TLS from certificate files (mTLS between services, TLS
on the gateway), compression, and where OpenTelemetry spans go. Every service adds these
flags with `add_flags` and keeps one `Transport` in its settings; grpcutil.new_server and
grpcutil.channel apply it, so no service repeats the TLS code.

Plaintext is the default: without --tls-cert and --tls-key a server listens in cleartext,
and without any --tls-* file a client channel is insecure.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from meshserve.common.errors import ConfigError
from meshserve.common.settings import Flags, parse_list

CLIENT_AUTH = ("require", "optional", "none")
COMPRESSION = ("none", "gzip")


@dataclass(frozen=True, slots=True)
class Transport:
    # PEM files; all empty: plaintext.
    tls_cert: str = ""  # this service's certificate (served, and shown to the servers it calls)
    tls_key: str = ""
    tls_ca: str = ""  # verifies peers: the servers this service calls, and its clients
    # With --tls-ca, whether clients must show a certificate the CA signed (mTLS).
    tls_client_auth: str = "require"
    # Verifies client certificates on this port instead of tls_ca (the gateway: a CA of
    # external clients, separate from the mesh's).
    tls_client_ca: str = ""
    # Common names of the client certificates this port serves (empty: any the CA signed).
    tls_allowed_clients: tuple[str, ...] = ()
    compression: str = "none"  # default compression of this server's responses
    channel_compression: str = "none"  # of the requests this service sends to the others
    otlp_endpoint: str = ""  # OpenTelemetry collector (OTEL_EXPORTER_OTLP_ENDPOINT); empty: off

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-ca", self.tls_ca), ("--tls-client-ca", self.tls_client_ca)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{flag} {path!r}: no such file")
        if self.tls_client_auth not in CLIENT_AUTH:
            raise ConfigError(f"--tls-client-auth {self.tls_client_auth!r}: expected one of "
                              f"{', '.join(CLIENT_AUTH)}")
        if self.server_tls and self.tls_client_auth == "require" and not self.client_ca:
            raise ConfigError("--tls-client-auth require needs --tls-ca (or --tls-client-ca) "
                              "to check client certificates; give one, or "
                              "--tls-client-auth none to serve TLS without client certificates")
        if self.tls_allowed_clients and not (
                self.server_tls and self.tls_client_auth == "require" and self.client_ca):
            raise ConfigError("--tls-allowed-clients needs TLS on this port with "
                              "--tls-client-auth require and a CA (--tls-ca)")
        for flag, value in (("--compression", self.compression),
                            ("--channel-compression", self.channel_compression)):
            if value not in COMPRESSION:
                raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(COMPRESSION)}")

    @property
    def server_tls(self) -> bool:
        """This service's own port speaks TLS."""
        return bool(self.tls_cert)

    @property
    def client_ca(self) -> str:
        """The CA that checks client certificates on this port."""
        return self.tls_client_ca or self.tls_ca

    @property
    def client_tls(self) -> bool:
        """Channels to the other services speak TLS (a CA to check them, or our own cert)."""
        return bool(self.tls_ca or self.tls_cert)

    def read(self, path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None


PLAINTEXT = Transport()


def add_flags(flags: Flags, client_auth: str = "require") -> None:
    """--tls-cert, --tls-key, --tls-ca, --tls-client-auth, --compression,
    --channel-compression and --otlp-endpoint (each also MESHSERVE_<FLAG>)."""
    flags.add("--tls-cert", str, "", "PEM certificate of this service (with --tls-key: TLS)")
    flags.add("--tls-key", str, "", "PEM private key of --tls-cert")
    flags.add("--tls-ca", str, "",
              "PEM CA bundle: verifies the services this one calls and, on this port, client "
              "certificates (mTLS, see --tls-client-auth)")
    flags.add("--tls-client-auth", str, client_auth,
              "with --tls-ca: require, optional or none (client certificates)")
    flags.add("--tls-client-ca", str, "",
              "PEM CA bundle checking client certificates on this port instead of --tls-ca "
              "(the gateway: a CA of external clients, separate from the mesh's)")
    flags.add("--tls-allowed-clients", parse_list, (),
              "common names of the client certificates served on this port, comma list "
              "(e.g. a worker: meshserve-batcher); empty: any certificate the CA signed")
    flags.add("--compression", str, "none", "default compression of responses: none or gzip")
    flags.add("--channel-compression", str, "none",
              "compression of requests to the other services: none or gzip")
    flags.add("--otlp-endpoint", str, flags.env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
              "OpenTelemetry OTLP/gRPC collector for spans (also env "
              "OTEL_EXPORTER_OTLP_ENDPOINT; needs opentelemetry-sdk); empty: trace ids in logs")


def from_args(flags: Flags, a: argparse.Namespace) -> Transport:
    """The Transport of parsed flags; an invalid one exits with the parser's usage error."""
    try:
        return _from_args(a)
    except ConfigError as e:
        flags.parser.error(str(e))
        raise  # unreachable: error() exits


def _from_args(a: argparse.Namespace) -> Transport:
    return Transport(
        tls_cert=a.tls_cert, tls_key=a.tls_key, tls_ca=a.tls_ca,
        tls_client_auth=a.tls_client_auth.strip().lower(),
        tls_client_ca=a.tls_client_ca, tls_allowed_clients=tuple(a.tls_allowed_clients),
        compression=a.compression.strip().lower(),
        channel_compression=a.channel_compression.strip().lower(),
        otlp_endpoint=a.otlp_endpoint.strip(),
    )
