//! The HTTP API: one router, built from the handlers of each spec chapter.

pub mod admin;
pub mod client;
pub mod federation;

use axum::Router;
use axum::routing::{MethodRouter, get, post, put};

use crate::state::AppState;

/// Registers a client-server endpoint under both `/v3` and the legacy `/r0` prefix.
fn client(router: Router<AppState>, path: &str, handler: MethodRouter<AppState>) -> Router<AppState> {
    router
        .route(&format!("/_matrix/client/v3{path}"), handler.clone())
        .route(&format!("/_matrix/client/r0{path}"), handler)
}

/// The media repository's routes (`api/client/media.rs`, `api/admin/media.rs`).
fn media_routes(r: Router<AppState>) -> Router<AppState> {
    use admin::media as am;
    use client::media as m;
    let mut r = r
        .route("/_matrix/client/v1/media/config", get(m::config))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}", get(m::download))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}/{file_name}", get(m::download_named))
        .route("/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}", get(m::thumbnail))
        .route("/_matrix/client/v1/media/preview_url", get(m::preview_url))
        .route("/_matrix/media/v1/create", post(m::create))
        .route("/_synapse/admin/v1/media/{server_name}/{media_id}", get(am::info).delete(am::delete))
        .route("/_synapse/admin/v1/media/quarantine/{server_name}/{media_id}", post(am::quarantine))
        .route("/_synapse/admin/v1/media/unquarantine/{server_name}/{media_id}", post(am::unquarantine))
        .route("/_synapse/admin/v1/purge_media_cache", post(am::purge_cache))
        .route("/_synapse/admin/v1/users/{user_id}/media", get(am::list_user_media).delete(am::delete_user_media));
    for v in ["v3", "r0"] {
        r = r
            .route(&format!("/_matrix/media/{v}/upload"), post(m::upload))
            .route(&format!("/_matrix/media/{v}/upload/{{server_name}}/{{media_id}}"), put(m::upload_reserved))
            .route(&format!("/_matrix/media/{v}/config"), get(m::config))
            .route(&format!("/_matrix/media/{v}/preview_url"), get(m::preview_url))
            .route(&format!("/_matrix/media/{v}/download/{{server_name}}/{{media_id}}"), get(m::legacy_download))
            .route(
                &format!("/_matrix/media/{v}/download/{{server_name}}/{{media_id}}/{{file_name}}"),
                get(m::legacy_download_named),
            )
            .route(&format!("/_matrix/media/{v}/thumbnail/{{server_name}}/{{media_id}}"), get(m::legacy_thumbnail));
    }
    r
}

/// Calls and meetings (issue 18): MSC4140 delayed events, MSC4143 transports, the OpenID userinfo
/// endpoint (also on the federation listener), the room admin API Jitsi's verification service
/// reads, meeting rooms.
fn rtc_routes(r: Router<AppState>) -> Router<AppState> {
    use client::rtc;
    const DELAYED: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";
    r.route(DELAYED, get(rtc::list_delayed))
        .route(&format!("{DELAYED}/{{delay_id}}"), get(rtc::get_delayed).post(rtc::update_delayed))
        .route(&format!("{DELAYED}/{{delay_id}}/{{action}}"), post(rtc::update_delayed_action))
        .route("/_matrix/client/unstable/org.matrix.msc4143/rtc/transports", get(rtc::rtc_transports))
        .route("/_matrix/federation/v1/openid/userinfo", get(federation::openid_userinfo))
        .route("/_synapse/admin/v1/rooms/{room_id}/members", get(admin::rooms::members))
        .route("/_synapse/admin/v1/rooms/{room_id}/state", get(admin::rooms::state))
        .route("/_parvis/admin/v1/meetings", post(admin::rooms::create_meeting))
}

/// Bots and service alerts (issue 17): the appservice ping, alert webhooks and their admin API,
/// server notices.
fn bots_routes(r: Router<AppState>) -> Router<AppState> {
    use admin::webhooks as wh;
    r.route("/_matrix/client/v1/appservice/{appservice_id}/ping", post(client::appservice::ping))
        .route(crate::appservice::websocket::PATH, get(crate::appservice::websocket::connect))
        .route("/_parvis/webhook/{hook_id}", post(wh::receive))
        .route("/_parvis/admin/v1/webhooks", get(wh::list).post(wh::create))
        .route("/_parvis/admin/v1/webhooks/{hook_id}", axum::routing::delete(wh::revoke))
        .route("/_synapse/admin/v1/send_server_notice", post(wh::send_notice))
        .route("/_synapse/admin/v1/send_server_notice/{txn_id}", put(wh::send_notice_txn))
}

pub fn router() -> Router<AppState> {
    use client::{
        account, account_data, devices, directory, discovery, login, profile, pushrules, receipts, register, relations,
        rooms,
    };

    let mut r = Router::new()
        .route("/_matrix/client/versions", get(discovery::versions))
        .route("/.well-known/matrix/client", get(discovery::well_known_client))
        .route("/.well-known/matrix/server", get(discovery::well_known_server))
        .route("/_matrix/client/v1/register/m.login.registration_token/validity", get(register::token_validity));
    for (path, handler) in [
        ("/capabilities", get(discovery::capabilities)),
        ("/voip/turnServer", get(discovery::turn_server)),
        ("/thirdparty/protocols", get(client::appservice::protocols)),
        ("/thirdparty/protocol/{protocol}", get(client::appservice::protocol)),
        ("/thirdparty/user/{protocol}", get(client::appservice::user)),
        ("/thirdparty/location/{protocol}", get(client::appservice::location)),
        ("/register", post(register::register)),
        ("/register/available", get(register::available)),
        ("/login", get(login::flows).post(login::login)),
        ("/login/sso/redirect", get(client::sso::redirect)),
        ("/login/sso/redirect/{idp_id}", get(client::sso::redirect_idp)),
        ("/auth/m.login.sso/fallback/web", get(client::sso::uia_fallback)),
        ("/refresh", post(login::refresh)),
        ("/logout", post(login::logout)),
        ("/logout/all", post(login::logout_all)),
        ("/account/whoami", get(account::whoami)),
        ("/account/password", post(account::change_password)),
        ("/account/deactivate", post(account::deactivate)),
        ("/account/3pid", get(account::threepids).post(account::add_threepid)),
        ("/account/3pid/add", post(account::add_threepid)),
        ("/account/3pid/bind", post(account::add_threepid)),
        ("/account/3pid/delete", post(account::remove_threepid)),
        ("/account/3pid/unbind", post(account::remove_threepid)),
        ("/account/3pid/{medium}/requestToken", post(account::threepid_request_token)),
        ("/devices", get(devices::list)),
        ("/devices/{device_id}", get(devices::get).put(devices::rename).delete(devices::delete)),
        ("/delete_devices", post(devices::delete_many)),
        ("/profile/{user_id}", get(profile::get_profile)),
        ("/profile/{user_id}/{key}", get(profile::get_field).put(profile::set_field).delete(profile::delete_field)),
        ("/createRoom", post(rooms::create_room)),
        ("/joined_rooms", get(rooms::joined_rooms)),
        ("/join/{room_id_or_alias}", post(rooms::join)),
        ("/rooms/{room_id}/join", post(rooms::join_by_id)),
        ("/rooms/{room_id}/invite", post(rooms::invite)),
        ("/rooms/{room_id}/leave", post(rooms::leave)),
        ("/rooms/{room_id}/kick", post(rooms::kick)),
        ("/rooms/{room_id}/ban", post(rooms::ban)),
        ("/rooms/{room_id}/unban", post(rooms::unban)),
        ("/rooms/{room_id}/forget", post(rooms::forget)),
        ("/rooms/{room_id}/send/{event_type}/{txn_id}", put(rooms::send_message)),
        ("/rooms/{room_id}/state", get(rooms::get_state)),
        ("/rooms/{room_id}/state/{event_type}", get(rooms::get_state_event).put(rooms::put_state)),
        ("/rooms/{room_id}/state/{event_type}/", get(rooms::get_state_event).put(rooms::put_state)),
        ("/rooms/{room_id}/state/{event_type}/{state_key}", get(rooms::get_state_event).put(rooms::put_state)),
        ("/rooms/{room_id}/redact/{event_id}/{txn_id}", put(rooms::redact)),
        ("/rooms/{room_id}/event/{event_id}", get(rooms::get_event)),
        ("/rooms/{room_id}/messages", get(rooms::messages)),
        ("/rooms/{room_id}/members", get(rooms::members)),
        ("/rooms/{room_id}/initialSync", get(rooms::initial_sync)),
        ("/rooms/{room_id}/joined_members", get(rooms::joined_members)),
        ("/rooms/{room_id}/aliases", get(rooms::room_aliases)),
        ("/directory/room/{alias}", get(rooms::get_alias).put(rooms::put_alias).delete(rooms::delete_alias)),
        ("/rooms/{room_id}/context/{event_id}", get(relations::context)),
        ("/knock/{room_id_or_alias}", post(rooms::knock)),
        ("/rooms/{room_id}/upgrade", post(rooms::upgrade)),
        ("/publicRooms", get(directory::public_rooms_get).post(directory::public_rooms_post)),
        ("/directory/list/room/{room_id}", get(directory::get_visibility).put(directory::set_visibility)),
        ("/user_directory/search", post(directory::search_users)),
        ("/rooms/{room_id}/report/{event_id}", post(directory::report_event)),
        ("/rooms/{room_id}/report", post(directory::report_room)),
        ("/users/{user_id}/report", post(directory::report_user)),
        ("/user/{user_id}/account_data/{data_type}", get(account_data::get_global).put(account_data::put_global)),
        (
            "/user/{user_id}/rooms/{room_id}/account_data/{data_type}",
            get(account_data::get_room).put(account_data::put_room),
        ),
        ("/user/{user_id}/rooms/{room_id}/tags", get(account_data::get_tags)),
        ("/user/{user_id}/rooms/{room_id}/tags/{tag}", put(account_data::put_tag).delete(account_data::delete_tag)),
        ("/rooms/{room_id}/receipt/{receipt_type}/{event_id}", post(receipts::post_receipt)),
        ("/rooms/{room_id}/read_markers", post(receipts::read_markers)),
        ("/rooms/{room_id}/typing/{user_id}", put(receipts::typing)),
        ("/pushrules/", get(pushrules::get_all)),
        ("/pushrules", get(pushrules::get_all)),
        ("/pushrules/{scope}/", get(pushrules::get_scope)),
        ("/pushrules/{scope}", get(pushrules::get_scope)),
        (
            "/pushrules/{scope}/{kind}/{rule_id}",
            get(pushrules::get_rule).put(pushrules::put_rule).delete(pushrules::delete_rule),
        ),
        ("/pushrules/{scope}/{kind}/{rule_id}/enabled", get(pushrules::get_enabled).put(pushrules::put_enabled)),
        ("/pushrules/{scope}/{kind}/{rule_id}/actions", get(pushrules::get_actions).put(pushrules::put_actions)),
        ("/sync", get(client::sync::sync)),
        ("/user/{user_id}/openid/request_token", post(client::rtc::request_openid_token)),
        ("/search", post(client::search::search)),
        ("/user/{user_id}/filter", post(client::filter::create)),
        ("/user/{user_id}/filter/{filter_id}", get(client::filter::get)),
        ("/presence/{user_id}/status", get(client::presence::get).put(client::presence::set)),
        ("/pushers", get(client::pushers::list)),
        ("/pushers/set", post(client::pushers::set)),
        ("/notifications", get(client::notifications::list)),
        ("/keys/upload", post(client::keys::upload)),
        ("/keys/query", post(client::keys::query)),
        ("/keys/claim", post(client::keys::claim)),
        ("/keys/changes", get(client::keys::changes)),
        ("/keys/device_signing/upload", post(client::keys::device_signing_upload)),
        ("/keys/signatures/upload", post(client::keys::signatures_upload)),
        ("/sendToDevice/{event_type}/{txn_id}", put(client::keys::send_to_device)),
        ("/room_keys/version", post(client::keys::create_backup).get(client::keys::latest_backup)),
        (
            "/room_keys/version/{version}",
            get(client::keys::get_backup).put(client::keys::put_backup).delete(client::keys::delete_backup),
        ),
        (
            "/room_keys/keys",
            get(client::keys::get_all_keys).put(client::keys::put_all_keys).delete(client::keys::delete_all_keys),
        ),
        (
            "/room_keys/keys/{room_id}",
            get(client::keys::get_room_keys).put(client::keys::put_room_keys).delete(client::keys::delete_room_keys),
        ),
        (
            "/room_keys/keys/{room_id}/{session_id}",
            get(client::keys::get_session_key)
                .put(client::keys::put_session_key)
                .delete(client::keys::delete_session_key),
        ),
    ] {
        r = client(r, path, handler);
    }
    r = media_routes(r);
    r = rtc_routes(r);
    r = bots_routes(r);
    r.route("/_matrix/client/v1/rooms/{room_id}/relations/{event_id}", get(relations::relations))
        .route("/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}", get(relations::relations_by_type))
        .route(
            "/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}",
            get(relations::relations_by_type_and_event_type),
        )
        .route("/_matrix/client/v1/rooms/{room_id}/threads", get(relations::threads))
        .route("/_matrix/client/v1/rooms/{room_id}/hierarchy", get(client::spaces::hierarchy))
        .route("/_matrix/client/v1/room_summary/{room_id_or_alias}", get(directory::room_summary))
        .route(
            "/_matrix/client/unstable/im.nheko.summary/rooms/{room_id_or_alias}/summary",
            get(directory::room_summary),
        )
        .route("/_matrix/client/unstable/im.nheko.summary/summary/{room_id_or_alias}", get(directory::room_summary))
        .route(crate::sync::sliding::PATH, post(client::sliding_sync::sync))
        .route("/_matrix/client/v1/rooms/{room_id}/timestamp_to_event", get(relations::timestamp_to_event))
        .route(
            "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device",
            get(client::dehydrated::get).put(client::dehydrated::put).delete(client::dehydrated::delete),
        )
        .route(
            "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/{device_id}/events",
            post(client::dehydrated::events_post).get(client::dehydrated::events_get),
        )
        .route("/_matrix/client/v1/auth_metadata", get(client::oauth::auth_metadata))
        .route("/_matrix/client/unstable/org.matrix.msc2965/auth_metadata", get(client::oauth::auth_metadata))
        .route("/.well-known/openid-configuration", get(client::oauth::openid_configuration))
        .route(crate::oauth::REGISTRATION_PATH, post(client::oauth::register))
        .route(crate::oauth::AUTHORIZE_PATH, get(client::oauth::authorize))
        .route(crate::oauth::UPSTREAM_PATH, get(client::oauth::upstream))
        .route(crate::oauth::LOGIN_PATH, post(client::oauth::password_login))
        .route(crate::oauth::CONSENT_PATH, get(client::oauth::consent_page).post(client::oauth::consent_submit))
        .route(crate::oauth::TOKEN_PATH, post(client::oauth::token))
        .route(crate::oauth::REVOCATION_PATH, post(client::oauth::revoke))
        .route(crate::oauth::ACCOUNT_PATH, get(client::account_web::page))
        .route("/_parvis/account/upstream", get(client::account_web::upstream))
        .route("/_parvis/account/sso_done", get(client::account_web::sso_done))
        .route("/_parvis/account/login", post(client::account_web::password_login))
        .route("/_parvis/account/action", post(client::account_web::action))
        .route("/_parvis/account/logout", post(client::account_web::logout))
        .route(crate::sso::CALLBACK_PATH, get(client::sso::callback))
        .route(crate::sso::BACKCHANNEL_LOGOUT_PATH, post(client::sso::backchannel_logout))
        .route(crate::sso::LOGGED_OUT_PATH, get(client::sso::logged_out))
        .route("/_parvis/client/v1/logout/sso", post(client::sso::logout_sso))
        .route("/_synapse/admin/v2/users/{user_id}", get(admin::users::get).put(admin::users::put))
        .route("/_synapse/admin/v1/auth_providers/{provider}/users/{external_id}", get(admin::users::by_external_id))
        .route("/_synapse/admin/v1/register", get(admin::register::nonce).post(admin::register::register))
        .route("/_synapse/admin/v1/registration_tokens", get(admin::registration_tokens::list))
        .route("/_synapse/admin/v1/event_reports", get(admin::reports::list))
        .route("/_synapse/admin/v1/users/{user_id}/export", post(admin::exports::start))
        .route("/_synapse/admin/v1/users/{user_id}/export/{export_id}", get(admin::exports::status))
        .route("/_synapse/admin/v1/users/{user_id}/export/{export_id}/download", get(admin::exports::download))
        .route("/_synapse/admin/v1/registration_tokens/new", post(admin::registration_tokens::create))
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            get(admin::registration_tokens::get).delete(admin::registration_tokens::delete),
        )
}
