#!/usr/bin/env python3
"""Generate the LemonLDAP::NG configuration (lmConf-1.json) for the harness.

Stdlib only. Reads lmConf.template.json (static part, next to this file) and
fills in the dynamic part from environment variables, then writes
$LLNG_HOME/conf/lmConf-1.json (atomically).

Environment (defaults in brackets):
  LLNG_HOME                  [$TMPDIR/parvis-lemonldap]   state directory
  LLNG_HOST                  [auth.sso.localhost]       portal host name
  LLNG_PORT                  [19080]                    portal port (nginx, loopback)
  LLNG_DOMAIN                [parent of LLNG_HOST; the host itself for IPs/localhost]
                             SSO cookie domain (must not be empty)
  LLNG_CLIENT_ID             [matrix]
  LLNG_CLIENT_SECRET         [matrix-secret]
  LLNG_PARVIS_PORTS          [19091 ... 19099]  ports of the Parvis test servers: each gets
                             its callback and post-logout page registered
  LLNG_EXTRA_REDIRECT_URIS   ['']  further redirect URIs, space separated
  LLNG_POST_LOGOUT_REDIRECT_URIS ['']  further post-logout URIs, space separated
  LLNG_JWT_CLIENT_SECRET     [matrix-jwt-secret]  secret of the second RP, `matrix-jwt`
  LLNG_FRONTCHANNEL_LOGOUT_URL   ['']  RP front-channel logout URL (iframe on portal logout)
  LLNG_LOGOUT_BYPASS_CONFIRM [1]   1: end_session redirects without a confirmation page
  LLNG_REQUIRE_PKCE          [1]   1: the RP must send code_challenge (S256 or plain); NB: 2.16
                             verifies code_verifier ONLY when this is 1
  LLNG_BYPASS_CONSENT        [1]   0: show the consent page on first login
  LLNG_ACCESS_TOKEN_TTL      [3600]  seconds
  LLNG_ID_TOKEN_TTL          [3600]  seconds
  LLNG_CODE_TTL              [60]    authorization code lifetime, seconds
  LLNG_SESSION_TIMEOUT       [72000] SSO session lifetime, seconds
  LLNG_FORM_TIMEOUT          [120]   lifetime of the login form's CSRF token, seconds
"""
import ipaddress
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def env(name, default):
    v = os.environ.get(name)
    return default if v is None else v


def env_int(name, default):
    return int(env(name, str(default)))


def default_domain(host):
    """LemonLDAP::NG refuses an empty domain ("Configuration error: no domain").
    auth.sso.localhost -> sso.localhost (the usual LL::NG layout); an IP address,
    "localhost" or a two-label name -> the host itself (cookie for that host only)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.split(".")
    if len(labels) < 3:
        return host
    return ".".join(labels[1:])


def read(path):
    with open(path) as f:
        return f.read()


def main():
    home = env("LLNG_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "parvis-lemonldap"))
    host = env("LLNG_HOST", "auth.sso.localhost")
    port = env_int("LLNG_PORT", 19080)
    domain = env("LLNG_DOMAIN", default_domain(host))
    portal = "http://%s:%d/" % (host, port)

    client_id = env("LLNG_CLIENT_ID", "matrix")
    client_secret = env("LLNG_CLIENT_SECRET", "matrix-secret")
    # Parvis's integration tests (tests/integration/sso.rs) run their SSO servers on fixed
    # loopback ports, one per test, each with its callback registered here.
    ports = env("LLNG_PARVIS_PORTS", "19091 19092 19093 19094 19095 19096 19097 19098 19099").split()
    redirect_uris = ["http://127.0.0.1:%s/_synapse/client/oidc/callback" % p for p in ports]
    redirect_uris += env("LLNG_EXTRA_REDIRECT_URIS", "").split()
    post_logout = ["http://127.0.0.1:%s/_parvis/client/sso/logged_out" % p for p in ports]
    post_logout += env("LLNG_POST_LOGOUT_REDIRECT_URIS", "").split()

    with open(os.path.join(HERE, "lmConf.template.json")) as f:
        conf = json.load(f)
    conf.pop("_comment", None)

    data = os.path.join(home, "data")
    keys = os.path.join(home, "keys")

    # ---- DYNAMIC: portal / cookies --------------------------------------
    conf["cfgDate"] = str(int(time.time()))
    conf["portal"] = portal
    conf["domain"] = domain
    conf["timeout"] = env_int("LLNG_SESSION_TIMEOUT", 72000)
    conf["formTimeout"] = env_int("LLNG_FORM_TIMEOUT", 120)
    conf["locationRules"] = {host: {"default": "accept"}}
    conf["reloadUrls"] = {}

    # ---- DYNAMIC: storage paths (all under LLNG_HOME/data) ---------------
    conf["globalStorageOptions"] = {
        "Directory": data + "/sessions",
        "LockDirectory": data + "/sessions/lock",
        "generateModule": "Lemonldap::NG::Common::Apache::Session::Generate::SHA256",
    }
    conf["persistentStorageOptions"] = {
        "Directory": data + "/psessions",
        "LockDirectory": data + "/psessions/lock",
    }
    conf["localSessionStorageOptions"] = {
        "cache_depth": 3,
        "cache_root": data + "/cache",
        "default_expires_in": 600,
        "directory_umask": "007",
        "namespace": "lemonldap-ng-sessions",
    }
    conf["notificationStorageOptions"] = {"dirName": data + "/notifications"}

    # ---- DYNAMIC: OpenID Connect provider --------------------------------
    conf["oidcServiceMetaDataIssuer"] = portal
    conf["oidcServicePrivateKeySig"] = read(os.path.join(keys, "oidc-sig.key"))
    conf["oidcServicePublicKeySig"] = read(os.path.join(keys, "oidc-sig.pub"))
    conf["oidcServiceKeyIdSig"] = read(os.path.join(keys, "oidc-sig.kid")).strip()
    conf["oidcServiceAccessTokenExpiration"] = env_int("LLNG_ACCESS_TOKEN_TTL", 3600)
    conf["oidcServiceIDTokenExpiration"] = env_int("LLNG_ID_TOKEN_TTL", 3600)
    conf["oidcServiceAuthorizationCodeExpiration"] = env_int("LLNG_CODE_TTL", 60)

    # ---- DYNAMIC: the relying party --------------------------------------
    rp = conf["oidcRPMetaDataOptions"]["matrix"]
    rp["oidcRPMetaDataOptionsClientID"] = client_id
    rp["oidcRPMetaDataOptionsClientSecret"] = client_secret
    rp["oidcRPMetaDataOptionsRedirectUris"] = " ".join(redirect_uris)
    rp["oidcRPMetaDataOptionsPostLogoutRedirectUris"] = " ".join(post_logout)
    rp["oidcRPMetaDataOptionsLogoutBypassConfirm"] = env_int("LLNG_LOGOUT_BYPASS_CONFIRM", 1)
    rp["oidcRPMetaDataOptionsRequirePKCE"] = env_int("LLNG_REQUIRE_PKCE", 1)
    rp["oidcRPMetaDataOptionsBypassConsent"] = env_int("LLNG_BYPASS_CONSENT", 1)
    rp["oidcRPMetaDataOptionsLogoutUrl"] = env("LLNG_FRONTCHANNEL_LOGOUT_URL", "")
    rp["oidcRPMetaDataOptionsAccessTokenExpiration"] = env_int("LLNG_ACCESS_TOKEN_TTL", 3600)
    rp["oidcRPMetaDataOptionsIDTokenExpiration"] = env_int("LLNG_ID_TOKEN_TTL", 3600)
    rp["oidcRPMetaDataOptionsAuthorizationCodeExpiration"] = env_int("LLNG_CODE_TTL", 60)

    # A second relying party, `matrix-jwt`, as ProConnect behaves: the id_token carries no
    # profile claims and userinfo is answered as a signed JWT (application/jwt, RS256; LL::NG's
    # signed userinfo has no iss/aud).
    jwt = dict(rp)
    jwt["oidcRPMetaDataOptionsClientID"] = "matrix-jwt"
    jwt["oidcRPMetaDataOptionsClientSecret"] = env("LLNG_JWT_CLIENT_SECRET", "matrix-jwt-secret")
    jwt["oidcRPMetaDataOptionsDisplayName"] = "Matrix homeserver, signed userinfo (harness)"
    jwt["oidcRPMetaDataOptionsUserInfoSignAlg"] = "RS256"
    jwt["oidcRPMetaDataOptionsIDTokenForceClaims"] = 0
    conf["oidcRPMetaDataOptions"]["matrix-jwt"] = jwt
    conf["oidcRPMetaDataExportedVars"]["matrix-jwt"] = dict(conf["oidcRPMetaDataExportedVars"]["matrix"])
    conf["oidcRPMetaDataMacros"]["matrix-jwt"] = dict(conf["oidcRPMetaDataMacros"]["matrix"])

    out_dir = os.path.join(home, "conf")
    out = os.path.join(out_dir, "lmConf-1.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(conf, f, indent=3, sort_keys=True)
        f.write("\n")
    os.replace(tmp, out)
    print("wrote %s (portal=%s domain=%r client_id=%s redirect_uris=%s)"
          % (out, portal, domain, client_id, " ".join(redirect_uris)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
