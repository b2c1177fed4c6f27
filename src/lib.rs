//! Parvis, a Matrix homeserver on PostgreSQL. See `ARCHITECTURE.md` for the map.

pub mod api;
pub mod appservice;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod e2ee;
pub mod error;
pub mod federation;
pub mod glob;
pub mod http;
pub mod keys;
pub mod media;
pub mod oauth;
pub mod push;
pub mod records;
pub mod rooms;
pub mod rtc;
pub mod search;
pub mod server;
pub mod sso;
pub mod state;
pub mod storage;
pub mod sync;
pub mod users;
pub mod webhooks;
