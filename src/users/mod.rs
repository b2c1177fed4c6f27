//! Accounts: user ID rules, account creation, passwords and profiles.

pub mod deactivate;
pub mod directory;
pub mod password;
pub mod profile;

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;

/// Whether a user ID belongs to this server: its server part (everything after the first colon,
/// since localparts have none; any form of server name, with or without a port) is a valid
/// server name and exactly `server_name`.
pub fn is_local(user_id: &str, server_name: &str) -> bool {
    crate::federation::names::server_of(user_id).is_some_and(|s| s.as_str() == server_name)
}

/// Checks a localpart requested for a *new* account against the spec's grammar for user IDs
/// (`a-z`, `0-9`, `.`, `_`, `=`, `-`, `/`, `+`) and the 255-byte limit on the full user ID.
pub fn validate_new_localpart(localpart: &str, server_name: &str) -> ApiResult<()> {
    if localpart.is_empty() {
        return Err(Error::invalid_username("User ID cannot be empty"));
    }
    if let Some(c) =
        localpart.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/+".contains(*c)))
    {
        return Err(Error::invalid_username(format!(
            "User ID may only contain a-z, 0-9, and . _ = - / + (found {c:?})"
        )));
    }
    if localpart.len() + server_name.len() + 2 > 255 {
        return Err(Error::invalid_username("User ID is longer than 255 bytes"));
    }
    Ok(())
}

/// Turns what a client typed as a user name (`alice`, `@alice:server`) into (user_id, localpart).
/// Logging in is case-insensitive on the localpart, as with Synapse.
pub fn parse_login_user(input: &str, server_name: &str) -> ApiResult<(String, String)> {
    let input = input.trim();
    let localpart = match input.strip_prefix('@') {
        Some(rest) => {
            let (local, server) = rest.split_once(':').ok_or_else(|| Error::invalid_param("Invalid user ID"))?;
            if server != server_name {
                return Err(Error::forbidden("This server does not host that user"));
            }
            local
        }
        None => input,
    };
    if localpart.is_empty() {
        return Err(Error::invalid_param("Invalid user ID"));
    }
    let localpart = localpart.to_lowercase();
    Ok((format!("@{localpart}:{server_name}"), localpart))
}

pub struct NewAccount<'a> {
    pub localpart: &'a str,
    pub password: Option<&'a str>,
    pub is_admin: bool,
    pub user_type: Option<&'a str>,
    pub displayname: Option<&'a str>,
    /// A registration token to consume in the same transaction.
    pub registration_token: Option<&'a str>,
}

/// Validates and creates a local account. Returns the new user ID.
pub async fn create_account(state: &AppState, new: NewAccount<'_>) -> ApiResult<String> {
    let cfg = &state.config;
    validate_new_localpart(new.localpart, &cfg.server_name)?;
    check_not_reserved(state, new.localpart)?;
    if let Some(p) = new.password {
        check_password_policy(state, p)?;
    }
    let user_id = format!("@{}:{}", new.localpart, cfg.server_name);
    let hash = match new.password {
        Some(p) => Some(state.passwords.hash(p).await?),
        None => None,
    };
    let mut tx = state.db.begin().await?;
    if let Some(token) = new.registration_token
        && !storage::registration::consume_token(&mut *tx, token).await?
    {
        return Err(Error::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "M_UNAUTHORIZED",
            "Registration token is no longer valid",
        ));
    }
    let inserted = storage::users::insert(
        &mut tx,
        &storage::users::NewUser {
            user_id: &user_id,
            localpart: new.localpart,
            password_hash: hash.as_deref(),
            is_admin: new.is_admin,
            user_type: new.user_type,
            // Synapse's behaviour, which clients expect: the localpart is the initial display name.
            displayname: Some(new.displayname.unwrap_or(new.localpart)),
        },
    )
    .await?;
    if !inserted {
        return Err(Error::user_in_use());
    }
    tx.commit().await?;
    directory::refresh(state, &user_id).await?;
    tracing::info!(user_id, admin = new.is_admin, "account created");
    Ok(user_id)
}

pub fn check_not_reserved(state: &AppState, localpart: &str) -> ApiResult<()> {
    if state.config.registration.reserved_localparts.iter().any(|r| r == localpart) {
        return Err(Error::new(axum::http::StatusCode::BAD_REQUEST, "M_EXCLUSIVE", "This user ID is reserved"));
    }
    // An application service's exclusive namespace: only it registers these users.
    let user_id = format!("@{localpart}:{}", state.config.server_name);
    if state.appservices.exclusive_user_owner(&user_id).is_some() {
        return Err(Error::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_EXCLUSIVE",
            "This user ID is reserved by an application service",
        ));
    }
    Ok(())
}

/// Creates the account of a user an application service registers (`m.login.application_service`):
/// no password, no registration token, inside the appservice's namespace (checked by the caller).
pub async fn create_appservice_account(state: &AppState, localpart: &str) -> ApiResult<String> {
    validate_new_localpart(localpart, &state.config.server_name)?;
    let user_id = format!("@{localpart}:{}", state.config.server_name);
    let mut tx = state.db.begin().await?;
    let inserted = storage::users::insert(
        &mut tx,
        &storage::users::NewUser {
            user_id: &user_id,
            localpart,
            password_hash: None,
            is_admin: false,
            user_type: None,
            displayname: Some(localpart),
        },
    )
    .await?;
    if !inserted {
        return Err(Error::user_in_use());
    }
    tx.commit().await?;
    directory::refresh(state, &user_id).await?;
    tracing::info!(user_id, "appservice account created");
    Ok(user_id)
}

pub fn check_password_policy(state: &AppState, password: &str) -> ApiResult<()> {
    let min = state.config.auth.password_min_length;
    if password.chars().count() < min {
        return Err(Error::weak_password(format!("Password must be at least {min} characters")));
    }
    if password.len() > 512 {
        return Err(Error::weak_password("Password is too long (512 bytes at most)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_users_with_ports_in_server_names() {
        assert!(is_local("@a:ville.fr", "ville.fr"));
        assert!(is_local("@a:ville.fr:8448", "ville.fr:8448"));
        assert!(!is_local("@a:ville.fr:8448", "ville.fr"));
        assert!(!is_local("@a:ville.fr", "ville.fr:8448"));
        assert!(is_local("@a:[::1]:8448", "[::1]:8448"));
        assert!(!is_local("@a:autre.ville.fr", "ville.fr"));
        assert!(!is_local("nocolon", "ville.fr"));
        assert!(is_local("@a:1.2.3.4:8448", "1.2.3.4:8448"));
        assert!(is_local("@a:1.2.3.4", "1.2.3.4"));
        assert!(!is_local("@a:1.2.3.4:8448", "1.2.3.4"));
        assert!(is_local("@a:[2001:db8::1]", "[2001:db8::1]"));
        assert!(!is_local("@a:[::1]:8448", "[::1]"));
        assert!(!is_local("@a:ville.fr:bad", "ville.fr:bad"));
    }

    #[test]
    fn localpart_grammar() {
        for ok in ["alice", "a.b_c=d-e/f+g", "0123", "x"] {
            assert!(validate_new_localpart(ok, "localhost").is_ok(), "{ok}");
        }
        for bad in ["", "Alice", "al ice", "al:ice", "é", "@a", "a#b"] {
            let e = validate_new_localpart(bad, "localhost").unwrap_err();
            assert_eq!(e.errcode, "M_INVALID_USERNAME", "{bad}");
        }
        let long = "a".repeat(250);
        assert!(validate_new_localpart(&long, "localhost").is_err());
    }

    #[test]
    fn login_user_forms() {
        assert_eq!(parse_login_user("Alice", "hs").unwrap().0, "@alice:hs");
        assert_eq!(parse_login_user("@alice:hs", "hs").unwrap().1, "alice");
        assert_eq!(parse_login_user("@alice:other", "hs").unwrap_err().errcode, "M_FORBIDDEN");
        assert!(parse_login_user("@alice", "hs").is_err());
        assert!(parse_login_user("", "hs").is_err());
        // Server names with ports and IP literals.
        for server in ["[::1]:8448", "1.2.3.4:8448", "1.2.3.4", "[2001:db8::1]", "ville.fr:8448"] {
            let (id, local) = parse_login_user(&format!("@Alice:{server}"), server).unwrap();
            assert_eq!((id.as_str(), local.as_str()), (format!("@alice:{server}").as_str(), "alice"));
            assert!(is_local(&id, server));
            assert_eq!(parse_login_user(&format!("@alice:{server}"), "hs").unwrap_err().errcode, "M_FORBIDDEN");
        }
        assert_eq!(parse_login_user("@alice:[::1]:8448", "[::1]").unwrap_err().errcode, "M_FORBIDDEN");
    }
}
