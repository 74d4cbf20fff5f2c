#!/usr/bin/env bash
# Makes a development CA and certificates for meshserve's TLS / mTLS (needs openssl).
#
#   deploy/tls/make-dev-certs.sh DIR [EXTRA_NAME...]
#
# writes into DIR (created if needed):
#   ca.crt, ca.key          the CA (keep ca.key out of the cluster)
#   tls.crt, tls.key        one certificate shared by every service (CN meshserve), for
#                           serving and for calling the other services (serverAuth +
#                           clientAuth); SANs: localhost, 127.0.0.1, ::1, and
#                           meshserve-{gateway,batcher,worker,cache} with their .NAMESPACE,
#                           .NAMESPACE.svc and .NAMESPACE.svc.cluster.local forms (NAMESPACE:
#                           env NAMESPACE, default meshserve), plus every EXTRA_NAME (a DNS
#                           name, or an IP address)
#   SERVICE.crt, SERVICE.key  one certificate per service (gateway, batcher, worker, cache,
#                           async-runner): CN meshserve-SERVICE, SANs its own names (and
#                           localhost, 127.0.0.1, ::1, EXTRA_NAMEs). A service's identity is
#                           its CN: --tls-allowed-clients names who may call it (a worker:
#                           meshserve-batcher; the cache: meshserve-gateway,...)
#   client-ca.crt, client-ca.key  a SEPARATE CA for external clients (the gateway's
#                           --tls-client-ca): its certificates open no internal port
#   client.crt, client.key  a client certificate (clientAuth) for external clients, signed
#                           by client-ca
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

local_sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do
  if [[ $extra =~ ^[0-9.]+$ || $extra == *:* ]]; then
    local_sans="$local_sans,IP:$extra"
  else
    local_sans="$local_sans,DNS:$extra"
  fi
done
names() { echo "DNS:$1,DNS:$1.$ns,DNS:$1.$ns.svc,DNS:$1.$ns.svc.cluster.local"; }
sans="$local_sans"
for svc in gateway batcher worker cache; do
  sans="$sans,$(names "meshserve-$svc")"
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# make_ca NAME CN: NAME.key + self-signed NAME.crt
make_ca() {
  key "$1.key"
  openssl req -x509 -new -key "$1.key" -sha256 -days "$days" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$1.crt"
}
make_ca ca "meshserve dev CA"
make_ca client-ca "meshserve dev client CA"

# sign CA NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by CA
sign() {
  local ext
  ext=$(mktemp)
  printf '%s\n' "$4" > "$ext"
  key "$2.key"
  openssl req -new -key "$2.key" -subj "$3" -out "$2.csr"
  openssl x509 -req -in "$2.csr" -CA "$1.crt" -CAkey "$1.key" -CAcreateserial -sha256 \
    -days "$days" -extfile "$ext" -out "$2.crt" 2>/dev/null
  rm -f "$2.csr" "$ext"
}
service_ext() {
  echo "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$1"
}

sign ca tls "/CN=meshserve" "$(service_ext "$sans")"
for svc in gateway batcher worker cache async-runner; do
  sign ca "$svc" "/CN=meshserve-$svc" "$(service_ext "$local_sans,$(names "meshserve-$svc")")"
done
sign client-ca client "/CN=meshserve-client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f ca.srl client-ca.srl
chmod 644 ./*.crt
chmod 600 ./*.key
echo "certificates in $out: ca.crt tls.crt tls.key, {gateway,batcher,worker,cache,async-runner}.{crt,key}, client-ca.crt client.crt client.key"
