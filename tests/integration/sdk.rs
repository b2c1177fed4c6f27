//! The server driven by `matrix-sdk`, the library Element X is built on.

use matrix_sdk::Client;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::{OwnedDeviceId, mxc_uri};

use crate::common::*;

async fn client(s: &TestServer) -> Client {
    Client::builder().homeserver_url(&s.base).build().await.expect("client builds")
}

#[tokio::test]
async fn element_x_style_session() {
    let s = TestServer::start().await;
    s.register("agent.sdk", false).await;

    let c = client(&s).await;
    // Wrong password is a proper client-API error the SDK understands.
    let err = c.matrix_auth().login_username("agent.sdk", "wrong").send().await.unwrap_err();
    let api = err.as_client_api_error().expect("a Matrix error");
    assert_eq!(api.status_code.as_u16(), 403);

    let login = c
        .matrix_auth()
        .login_username("agent.sdk", PASSWORD)
        .initial_device_display_name("Element X (test)")
        .send()
        .await
        .expect("login");
    assert_eq!(login.user_id.as_str(), "@agent.sdk:localhost");

    let who = c.whoami().await.expect("whoami");
    assert_eq!(who.user_id, login.user_id);
    assert_eq!(who.device_id.as_deref(), Some(&*login.device_id));

    // Devices: list, rename, see the rename.
    let devices = c.devices().await.expect("devices").devices;
    assert!(
        devices.iter().any(|d| d.device_id == login.device_id && d.display_name.as_deref() == Some("Element X (test)"))
    );
    c.rename_device(&login.device_id, "Téléphone de service").await.expect("rename");
    let devices = c.devices().await.unwrap().devices;
    assert!(devices.iter().any(|d| d.display_name.as_deref() == Some("Téléphone de service")));

    // Profile.
    let account = c.account();
    account.set_display_name(Some("Agent SDK")).await.expect("set displayname");
    assert_eq!(account.get_display_name().await.unwrap().as_deref(), Some("Agent SDK"));
    account.set_avatar_url(Some(mxc_uri!("mxc://localhost/avatar123"))).await.expect("set avatar");
    assert_eq!(account.get_avatar_url().await.unwrap().unwrap().as_str(), "mxc://localhost/avatar123");
    let profile = account.fetch_user_profile().await.expect("profile");
    assert_eq!(profile.get("displayname").and_then(|v| v.as_str().map(str::to_owned)).as_deref(), Some("Agent SDK"));

    // A second client logs in; the first deletes it through UIA, as Element's session manager does.
    let c2 = client(&s).await;
    let login2 = c2.matrix_auth().login_username("@agent.sdk:localhost", PASSWORD).send().await.expect("second login");
    let victim: Vec<OwnedDeviceId> = vec![login2.device_id.clone()];
    let err = c.delete_devices(&victim, None).await.unwrap_err();
    let info = err.as_uiaa_response().expect("UIA challenge");
    assert!(info.flows.iter().any(|f| f.stages.iter().any(|s| s.as_str() == "m.login.password")));
    let mut password = uiaa::Password::new(
        uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new("agent.sdk".to_owned())),
        PASSWORD.to_owned(),
    );
    password.session = info.session.clone();
    c.delete_devices(&victim, Some(uiaa::AuthData::Password(password))).await.expect("delete with UIA");
    assert!(c2.whoami().await.is_err(), "deleted device's token is revoked");
    assert!(!c.devices().await.unwrap().devices.iter().any(|d| d.device_id == login2.device_id));

    // Logout.
    c.matrix_auth().logout().await.expect("logout");
    let c3 = client(&s).await;
    c3.matrix_auth().login_username("agent.sdk", PASSWORD).send().await.expect("login again");
    let left = c3.devices().await.unwrap().devices;
    assert!(!left.iter().any(|d| d.device_id == login.device_id), "logout deletes the device");
    assert_eq!(left.len(), 2, "the registration's device and this one");
    s.stop().await;
}
