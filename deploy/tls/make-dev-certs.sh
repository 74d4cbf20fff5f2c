#!/usr/bin/env bash
# Makes a development CA and certificates for meshserve's TLS / mTLS (needs openssl).
#
#   deploy/tls/make-dev-certs.sh DIR [EXTRA_NAME...]
#
# writes into DIR (created if needed):
#   ca.crt, ca.key          the CA (keep ca.key out of the cluster)
#   tls.crt, tls.key        the services' certificate, for serving and for calling the
#                           other services (serverAuth + clientAuth); SANs: localhost,
#                           127.0.0.1, ::1, and meshserve-{gateway,batcher,worker,cache} with
#                           their .NAMESPACE, .NAMESPACE.svc and .NAMESPACE.svc.cluster.local
#                           forms (NAMESPACE: env NAMESPACE, default meshserve), plus every
#                           EXTRA_NAME (a DNS name, or an IP address)
#   client.crt, client.key  a client certificate (clientAuth) for external clients
# Development only: EC P-256 keys, valid DAYS days (default 365), no revocation.
set -euo pipefail

out=${1:?usage: make-dev-certs.sh DIR [EXTRA_NAME...]}
shift
ns=${NAMESPACE:-meshserve}
days=${DAYS:-365}
command -v openssl >/dev/null || { echo "make-dev-certs.sh needs openssl" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for svc in gateway batcher worker cache; do
  name="meshserve-$svc"
  sans="$sans,DNS:$name,DNS:$name.$ns,DNS:$name.$ns.svc,DNS:$name.$ns.svc.cluster.local"
done
for extra in "$@"; do
  if [[ $extra =~ ^[0-9.]+$ || $extra == *:* ]]; then sans="$sans,IP:$extra"; else sans="$sans,DNS:$extra"; fi
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=meshserve dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

# sign NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by the CA
sign() {
  local ext
  ext=$(mktemp)
  printf '%s\n' "$3" > "$ext"
  key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -extfile "$ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$ext"
}

sign tls "/CN=meshserve" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans"
sign client "/CN=meshserve-client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 644 ca.crt tls.crt client.crt
chmod 600 ca.key tls.key client.key
echo "certificates in $out: ca.crt tls.crt tls.key client.crt client.key"
