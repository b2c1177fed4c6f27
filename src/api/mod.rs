//! The HTTP API: one router, built from the handlers of each spec chapter.

pub mod admin;
pub mod client;

use axum::Router;
use axum::routing::{MethodRouter, get, post};

use crate::state::AppState;

/// Registers a client-server endpoint under both `/v3` and the legacy `/r0` prefix.
fn client(router: Router<AppState>, path: &str, handler: MethodRouter<AppState>) -> Router<AppState> {
    router
        .route(&format!("/_matrix/client/v3{path}"), handler.clone())
        .route(&format!("/_matrix/client/r0{path}"), handler)
}

pub fn router() -> Router<AppState> {
    use client::{account, devices, discovery, login, profile, register};

    let mut r = Router::new()
        .route("/_matrix/client/versions", get(discovery::versions))
        .route("/.well-known/matrix/client", get(discovery::well_known_client))
        .route("/.well-known/matrix/server", get(discovery::well_known_server))
        .route("/_matrix/client/v1/register/m.login.registration_token/validity", get(register::token_validity));
    for (path, handler) in [
        ("/capabilities", get(discovery::capabilities)),
        ("/voip/turnServer", get(discovery::turn_server)),
        ("/thirdparty/protocols", get(discovery::thirdparty_protocols)),
        ("/register", post(register::register)),
        ("/register/available", get(register::available)),
        ("/login", get(login::flows).post(login::login)),
        ("/refresh", post(login::refresh)),
        ("/logout", post(login::logout)),
        ("/logout/all", post(login::logout_all)),
        ("/account/whoami", get(account::whoami)),
        ("/account/password", post(account::change_password)),
        ("/account/deactivate", post(account::deactivate)),
        ("/devices", get(devices::list)),
        ("/devices/{device_id}", get(devices::get).put(devices::rename).delete(devices::delete)),
        ("/delete_devices", post(devices::delete_many)),
        ("/profile/{user_id}", get(profile::get_profile)),
        ("/profile/{user_id}/{key}", get(profile::get_field).put(profile::set_field).delete(profile::delete_field)),
    ] {
        r = client(r, path, handler);
    }
    r.route("/_synapse/admin/v1/register", get(admin::register::nonce).post(admin::register::register))
        .route("/_synapse/admin/v1/registration_tokens", get(admin::registration_tokens::list))
        .route("/_synapse/admin/v1/registration_tokens/new", post(admin::registration_tokens::create))
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            get(admin::registration_tokens::get).delete(admin::registration_tokens::delete),
        )
}
