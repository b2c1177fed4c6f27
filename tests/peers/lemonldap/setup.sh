#!/usr/bin/env bash
# Reproducible, non-interactive setup of a REAL LemonLDAP::NG 2.16 (Debian bookworm
# packages) acting as OpenID Connect provider for Parvis's SSO tests (tests/integration/sso.rs).
# `.ci/run` runs it; by hand: `sudo bash tests/peers/lemonldap/setup.sh`, then
# `PARVIS_TEST_LLNG_ISSUER=http://auth.sso.localhost:19080/ cargo test --test integration sso`.
#
#   - installs nginx-light + lemonldap-ng-fastcgi-server + portal/manager perl libs
#   - writes a self-contained config under $LLNG_HOME (default /tmp/lemonldap);
#     the system-wide /etc/lemonldap-ng and /etc/nginx are NOT modified
#   - portal + OIDC provider on http://$LLNG_HOST:$LLNG_PORT/ (loopback only),
#     Demo authentication backend (dwho/dwho, rtyler/rtyler, msmith/msmith)
#   - one relying party: client_id matrix / secret matrix-secret (see gen_conf.py for env knobs)
#   - starts llng-fastcgi-server and nginx in the background (no systemd needed),
#     writes their PIDs to $LLNG_HOME/run/pids (stop.sh kills exactly those PIDs)
#
# Idempotent: re-running stops the previous instance started by this script,
# regenerates the configuration (keeping the signing key), wipes sessions and
# caches, and starts again.
#
# Usage: bash setup.sh            (env knobs: see README.md / gen_conf.py)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LLNG_HOME="${LLNG_HOME:-${TMPDIR:-/tmp}/parvis-lemonldap}"
export LLNG_HOST="${LLNG_HOST:-auth.sso.localhost}"
export LLNG_PORT="${LLNG_PORT:-19080}"
LLNG_LOGLEVEL="${LLNG_LOGLEVEL:-notice}"     # error|warn|notice|info|debug
LLNG_NPROC="${LLNG_NPROC:-2}"                # FastCGI worker processes
PORTAL="http://${LLNG_HOST}:${LLNG_PORT}/"

RUN="$LLNG_HOME/run"
LOGS="$LLNG_HOME/logs"
DATA="$LLNG_HOME/data"
ETC="$LLNG_HOME/etc"
KEYS="$LLNG_HOME/keys"
PIDS="$RUN/pids"

t0=$(date +%s.%N)
log() { printf '[setup %6.1fs] %s\n' "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*"; }
die() { echo "setup.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, /etc/hosts, setuid to www-data)"
case "$LLNG_PORT" in 8008|8448|18008|5432) die "port $LLNG_PORT is reserved for others";; esac

# ---------------------------------------------------------------- 0. stop old
if [ -f "$PIDS" ]; then
    log "stopping previous instance (PIDs from $PIDS)"
    bash "$HERE/stop.sh"
fi

# ---------------------------------------------------------------- 1. packages
PKGS=(lemonldap-ng-fastcgi-server liblemonldap-ng-portal-perl
      liblemonldap-ng-manager-perl libcrypt-openssl-bignum-perl libhttp-parser-xs-perl
      libcookie-baker-xs-perl libstring-random-perl libapache-session-browseable-perl
      liblwp-protocol-https-perl libio-string-perl libconvert-base32-perl
      libdigest-hmac-perl libemail-sender-perl libmime-tools-perl
      libgd-securityimage-perl libimage-magick-perl libipc-run-perl libunicode-string-perl
      openssl curl)
# any nginx flavour will do; install nginx-light when none is present
command -v nginx >/dev/null 2>&1 || PKGS+=(nginx-light)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # /usr/sbin/policy-rc.d (exit 101) keeps the packages from starting services on
    # port 80; if it is absent we add a temporary one for the install only.
    tmp_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; tmp_policy=1
    fi
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" \
        > "${TMPDIR:-/tmp}/llng-apt-install.log" 2>&1 || { tail -30 "${TMPDIR:-/tmp}/llng-apt-install.log"; die "apt-get install failed"; }
    [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    log "packages installed"
else
    log "packages already installed"
fi
command -v nginx >/dev/null || die "nginx not found"
[ -x /usr/sbin/llng-fastcgi-server ] || die "llng-fastcgi-server not found"

# ---------------------------------------------------------------- 2. /etc/hosts
if ! [[ "$LLNG_HOST" =~ ^[0-9.]+$ ]] && [ "$LLNG_HOST" != localhost ]; then
    if ! getent ahostsv4 "$LLNG_HOST" 2>/dev/null | awk '{print $1}' | grep -qx 127.0.0.1; then
        log "adding '127.0.0.1 $LLNG_HOST' to /etc/hosts"
        echo "127.0.0.1 $LLNG_HOST" >> /etc/hosts
    fi
fi

# ---------------------------------------------------------------- 3. dirs
mkdir -p "$RUN/nginx-tmp" "$LOGS" "$ETC" "$KEYS" "$LLNG_HOME/conf"
for f in "$LOGS"/*.log; do [ -f "$f" ] && mv -f "$f" "$f.prev"; done   # keep one previous run
# fresh runtime state: sessions, caches (config cache must not survive a conf rewrite)
rm -rf "$DATA"
mkdir -p "$DATA"/{sessions/lock,psessions/lock,cache,notifications,captcha}
chown -R www-data:www-data "$DATA" "$RUN/nginx-tmp"
chmod 770 "$DATA"/*
chown root:www-data "$RUN" "$LLNG_HOME/conf"; chmod 770 "$RUN"; chmod 750 "$LLNG_HOME/conf"
chmod 755 "$LLNG_HOME"
chmod 700 "$KEYS"
rm -f "$RUN/llng-fastcgi.sock"

# ---------------------------------------------------------------- 4. signing key
if [ ! -s "$KEYS/oidc-sig.key" ] || [ ! -s "$KEYS/oidc-sig.pub" ] || [ ! -s "$KEYS/oidc-sig.kid" ]; then
    log "generating RSA-2048 OIDC signing key pair"
    openssl genrsa -traditional -out "$KEYS/oidc-sig.key" 2048 2>/dev/null
    openssl rsa -in "$KEYS/oidc-sig.key" -pubout -out "$KEYS/oidc-sig.pub" 2>/dev/null
    openssl rand -hex 8 > "$KEYS/oidc-sig.kid"
    chmod 600 "$KEYS"/oidc-sig.*
else
    log "reusing signing key $(cat "$KEYS/oidc-sig.kid")"
fi

# ---------------------------------------------------------------- 5. config
sed -e "s#@LLNG_HOME@#$LLNG_HOME#g" -e "s#@LLNG_LOGLEVEL@#$LLNG_LOGLEVEL#g" \
    "$HERE/lemonldap-ng.ini.template" > "$ETC/lemonldap-ng.ini"
sed -e "s#@LLNG_HOME@#$LLNG_HOME#g" -e "s#@LLNG_HOST@#$LLNG_HOST#g" -e "s#@LLNG_PORT@#$LLNG_PORT#g" \
    "$HERE/nginx.conf.template" > "$ETC/nginx.conf"
rm -f "$LLNG_HOME"/conf/lmConf-*.json
python3 "$HERE/gen_conf.py"
chown root:www-data "$ETC/lemonldap-ng.ini" "$LLNG_HOME"/conf/lmConf-1.json
chmod 640 "$ETC/lemonldap-ng.ini" "$LLNG_HOME"/conf/lmConf-1.json
export LLNG_DEFAULTCONFFILE="$ETC/lemonldap-ng.ini"
export LLNG_DEFAULTLOGGER=Lemonldap::NG::Common::Logger::Std
# sanity check: LemonLDAP::NG itself can load the generated configuration
/usr/share/lemonldap-ng/bin/lemonldap-ng-cli -iniFile "$ETC/lemonldap-ng.ini" info >/dev/null \
    || die "lemonldap-ng-cli cannot read the generated configuration"
nginx -t -q -c "$ETC/nginx.conf" -e "$LOGS/nginx-error.log" || die "nginx -t failed"

# ---------------------------------------------------------------- 7. start
: > "$PIDS"
# if anything below fails, do not leave half a server running
trap 'echo "setup.sh: failed, stopping what was started" >&2; bash "$HERE/stop.sh" >&2' EXIT
log "starting llng-fastcgi-server ($LLNG_NPROC workers, socket $RUN/llng-fastcgi.sock)"
# --foreground: we background it ourselves; it drops privileges to www-data.
setsid /usr/sbin/llng-fastcgi-server --foreground -u www-data -g www-data -n "$LLNG_NPROC" \
    -s "$RUN/llng-fastcgi.sock" -p "$RUN/llng-fastcgi.pid" \
    >> "$LOGS/llng-fastcgi.log" 2>&1 < /dev/null &
echo "llng-fastcgi-server $!" >> "$PIDS"
for _ in $(seq 1 100); do [ -S "$RUN/llng-fastcgi.sock" ] && break; sleep 0.1; done
[ -S "$RUN/llng-fastcgi.sock" ] || { tail -n 20 "$LOGS/llng-fastcgi.log"; die "FastCGI socket did not appear"; }

log "starting nginx on 127.0.0.1:$LLNG_PORT"
setsid nginx -c "$ETC/nginx.conf" -e "$LOGS/nginx-error.log" \
    >> "$LOGS/nginx.out" 2>&1 < /dev/null &
echo "nginx $!" >> "$PIDS"

# ---------------------------------------------------------------- 8. wait until ready
ok=0; errors=0
for _ in $(seq 1 150); do
    code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "${PORTAL}.well-known/openid-configuration" || true)
    if [ "$code" = 200 ]; then ok=1; break; fi
    [ "$code" = 500 ] && errors=$((errors + 1))
    [ "$errors" -ge 10 ] && break                     # portal initialisation keeps failing
    while read -r name pid; do kill -0 "$pid" 2>/dev/null || { errors=99; break; }; done < "$PIDS"
    [ "$errors" -ge 99 ] && break                     # a server died
    sleep 0.2
done
if [ "$ok" != 1 ]; then
    grep -v 'Route "\*" redefined' "$LOGS/llng-fastcgi.log" | tail -n 20 >&2 || true
    tail -n 5 "$LOGS/nginx-error.log" >&2 || true
    die "portal did not answer on ${PORTAL}.well-known/openid-configuration (see $LOGS)"
fi
# warm up every FastCGI worker (each compiles the portal on its first request)
warm=()
for _ in $(seq 1 $((LLNG_NPROC * 2))); do
    curl -s --noproxy '*' -o /dev/null "${PORTAL}.well-known/openid-configuration" & warm+=($!)
done
wait "${warm[@]}"   # only the curls: a bare `wait` would wait for the daemons too
trap - EXIT
log "ready: issuer ${PORTAL}  (PIDs: $(tr '\n' ' ' < "$PIDS"))"
echo "discovery: ${PORTAL}.well-known/openid-configuration"
echo "stop:      bash $HERE/stop.sh"
