#![recursion_limit = "256"]
//! Integration tests: real servers, real PostgreSQL, real HTTP.

mod accounts;
mod appservice;
mod authz;
mod cli;
mod common;
mod dehydrated;
mod devices_profile;
mod discovery;
mod e2ee;
mod element;
mod ephemeral;
mod errors_limits;
mod filters;
mod hardening_accounts;
mod hardening_input;
mod jitsi;
mod js_sdk;
mod media;
mod presence;
mod push;
mod pushers;
mod pushrules;
mod records_export;
mod retention;
mod rooms;
mod rooms_more;
mod rtc;
mod sdk;
mod search;
mod spaces;
mod sso;
mod sync;
mod tokens;
mod visibility;
mod write_path;
