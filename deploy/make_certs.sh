#!/usr/bin/env bash
# Test certificates and node keys for a fedalloc deployment on loopback.
#
#   deploy/make_certs.sh OUTDIR [N_NODES]
#
# Writes into OUTDIR:
#   ca.key, ca.crt          a local certificate authority (self-signed ECDSA P-384, 1 year)
#   server.key, server.pem  the SuperLink's TLS certificate, signed by the CA,
#                           SAN IP:127.0.0.1, DNS:localhost
#   node<K>, node<K>.pub    for K = 0..N_NODES-1: a SuperNode's authentication key pair,
#                           ECDSA P-384 in OpenSSH format (what flower-supernode and
#                           `flwr supernode register` expect)
#
# For testing only: a real coordinator gets its server certificate from its own PKI, and each
# hospital makes its own key pair (`ssh-keygen -t ecdsa -b 384 -N "" -f node`) and sends only the
# .pub file to the coordinator. Existing files are kept (re-running adds missing node keys only);
# delete OUTDIR to start over.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUTDIR [N_NODES]" >&2
    exit 2
fi
OUT=$1
N=${2:-2}
if ! [[ "$N" =~ ^[0-9]+$ ]]; then
    echo "N_NODES must be a non-negative integer, got '$N'" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen not found" >&2; exit 1; }

mkdir -p "$OUT"
cd "$OUT"
umask 077

# 1. Certificate authority.
if [[ ! -s ca.key || ! -s ca.crt ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -sha384 -nodes -days 365 \
        -keyout ca.key -out ca.crt -subj "/CN=fedalloc test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    rm -f server.pem  # a new CA invalidates any old server certificate
fi

# 2. SuperLink server certificate (SAN IP:127.0.0.1, DNS:localhost), signed by the CA.
if [[ ! -s server.key || ! -s server.pem ]]; then
    cat > server.ext <<'EXT'
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
EXT
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -sha384 -nodes -keyout server.key -out server.csr \
        -subj "/CN=localhost" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.pem -days 365 -sha384 -extfile server.ext 2>/dev/null
    rm -f server.csr server.ext
fi
openssl verify -CAfile ca.crt server.pem >/dev/null

# 3. SuperNode authentication key pairs (OpenSSH format, ECDSA P-384).
for ((k = 0; k < N; k++)); do
    if [[ ! -s "node$k" || ! -s "node$k.pub" ]]; then
        rm -f "node$k" "node$k.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedalloc-node$k" -f "node$k"
    fi
done

chmod 644 ca.crt server.pem ./*.pub 2>/dev/null || true
echo "wrote CA, SuperLink certificate and $N node key pair(s) to $(pwd)"
