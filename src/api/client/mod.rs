//! Client-server API handlers, one module per chapter of the spec.

pub mod account;
pub mod account_data;
pub mod appservice;
pub mod dehydrated;
pub mod devices;
pub mod directory;
pub mod discovery;
pub mod filter;
pub mod keys;
pub mod login;
pub mod media;
pub mod notifications;
pub mod presence;
pub mod profile;
pub mod pushers;
pub mod pushrules;
pub mod receipts;
pub mod register;
pub mod relations;
pub mod rooms;
pub mod rtc;
pub mod search;
pub mod spaces;
pub mod sso;
pub mod sync;
