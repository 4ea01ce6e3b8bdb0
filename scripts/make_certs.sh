#!/usr/bin/env bash
# Test certificates for a Flower deployment with TLS (a private CA and one server
# certificate for the SuperLink). For trying TLS out on one machine, not for production:
# there, use your organisation's CA.
#
#   scripts/make_certs.sh OUT_DIR [HOST ...]
#
# writes OUT_DIR/ca.crt (give it to every SuperNode and to `fedlora run` as
# root_certificates), OUT_DIR/server.pem and OUT_DIR/server.key (the SuperLink's), valid
# for the given host names / IP addresses (default: localhost 127.0.0.1).
set -euo pipefail

out=${1:?usage: $0 OUT_DIR [HOST ...]}
shift
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=(localhost 127.0.0.1)

san=""
for h in "${hosts[@]}"; do
    if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

# The certificate authority (EC P-256 keys: quick to make, accepted by gRPC and uvicorn).
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -new -x509 -sha256 -days 30 -key ca.key -subj "/CN=fedlora test CA" -out ca.crt

# The SuperLink's key and certificate, signed by the CA, naming the hosts it serves.
openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -sha256 -key server.key -subj "/CN=${hosts[0]}" -out server.csr
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > server.ext
openssl x509 -req -sha256 -days 30 -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem

echo "made $out/ca.crt, $out/server.pem, $out/server.key for: ${hosts[*]}"
