#!/bin/bash
# Publish + install a 100 MiB artifact through the server's HTTPS endpoint (release build, loopback).
# Usage: cargo build --release -p herald-server -p herald-agent && bash bench/scripts/package_install.sh
# Peer: curl fetching the same artifact from the same endpoint. Loopback only.
set -e
B=${HERALD_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
D=$(mktemp -d /tmp/herald-measure.XXXX)
S="$B/herald-server --data-dir $D/srv"
$S init --public-addr 127.0.0.1:24433 --quic-listen 127.0.0.1:24433 --http-listen 127.0.0.1:28443 >/dev/null
$S serve > $D/server.log 2>&1 &
SPID=$!
sleep 1
$B/herald-agent --state-dir $D/a1 enroll "$($S token create)" --name a1 >/dev/null
$B/herald-agent --state-dir $D/a1 run > $D/a1.log 2>&1 &
APID=$!
PUB=$($S vendor keygen --out $D/acme.key | sed -n 's/public key: //p')
$S vendor add acme --key $PUB --packages 'acme-*' >/dev/null
head -c 104857600 /dev/urandom > $D/acme-big
for v in 1.0.0 1.0.1 1.0.2; do
  printf '.' >> $D/acme-big
  t0=$(date +%s.%N); $S package publish --quiet --vendor-key $D/acme.key acme-big $v $D/acme-big >/dev/null; t1=$(date +%s.%N)
  $S package install --to agent:a1 acme-big $v --wait >/dev/null; t2=$(date +%s.%N)
  SHA=$(sha256sum $D/acme-big | cut -d' ' -f1)
  t3=$(date +%s.%N); curl -sk -o /dev/null https://127.0.0.1:28443/api/v1/artifacts/$SHA; t4=$(date +%s.%N)
  echo "$v curl download $(echo "$t4 - $t3" | bc) s"
  echo "$v publish $(echo "$t1 - $t0" | bc) s, install $(echo "$t2 - $t1" | bc) s"
done
kill $APID $SPID; wait 2>/dev/null; rm -rf $D
