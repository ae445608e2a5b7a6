//! Auth of one EtcdCluster, managed (`spec.auth`): root's password Secret (made when none is
//! named), the operator's own calls as root, and auth turned on or off as the spec says, with
//! the `Auth` condition and `status.authEnabled`.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use rand::Rng;

use super::cluster::Reconciler;
use super::*;
use crate::members::Access;

/// Length of a generated root password (alphanumeric: ~190 bits).
const PASSWORD_LEN: usize = 32;

/// The release that first has auth: members of an older one would not apply auth changes.
const AUTH_SINCE: &str = "0.2.0";

/// What auth looks like after a reconcile: whether it is on, and the `Auth` condition (none
/// when `spec.auth` is not set: auth is then reported, not managed).
pub(super) struct AuthReport {
    pub enabled: Option<bool>,
    pub condition: Option<(bool, &'static str, String)>,
}

impl Reconciler<'_> {
    /// The Secret with root's password: the one `spec.auth` names, else the operator's own.
    fn root_secret_name(&self) -> String {
        self.ec
            .spec
            .auth
            .as_ref()
            .and_then(|a| a.root_secret.clone())
            .unwrap_or_else(|| self.names.root_secret())
    }

    /// How the operator reaches the members: as root once a password is known (the Secret
    /// exists), made now when auth is wanted and no Secret is named.
    pub(super) async fn root_access(&self) -> Result<Access, Error> {
        let api: Api<Secret> = self.api();
        let name = self.root_secret_name();
        let password = |s: &Secret| {
            s.data
                .as_ref()
                .and_then(|d| d.get("password"))
                .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
                .filter(|p| !p.is_empty())
        };
        if let Some(s) = api.get_opt(&name).await? {
            return Ok(Access {
                root_password: password(&s),
                tls: None,
            });
        }
        let wanted = self.ec.spec.auth.as_ref().is_some_and(|a| a.enabled);
        let named = self
            .ec
            .spec
            .auth
            .as_ref()
            .is_some_and(|a| a.root_secret.is_some());
        if !wanted || named {
            return Ok(Access::default());
        }
        let generated: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(PASSWORD_LEN)
            .map(char::from)
            .collect();
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.ns.to_string()),
                labels: Some(resources::labels(self.ec)),
                ..Default::default()
            },
            data: Some(
                [(
                    "password".to_string(),
                    ByteString(generated.clone().into_bytes()),
                )]
                .into(),
            ),
            type_: Some("Opaque".to_string()),
            ..Default::default()
        };
        // Not owned by the EtcdCluster: the members' volumes outlive it, and so must the
        // password that gets into them.
        match api.create(&kube::api::PostParams::default(), &secret).await {
            Ok(_) => {
                self.event(
                    EventType::Normal,
                    "RootSecretCreated",
                    "Auth",
                    format!("made Secret {name} with a generated password for root"),
                )
                .await;
                Ok(Access {
                    root_password: Some(generated),
                    tls: None,
                })
            }
            // Made meanwhile (another reconcile): read it.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let s = api.get(&name).await?;
                Ok(Access {
                    root_password: password(&s),
                    tls: None,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Turns auth on or off as `spec.auth` says, once the cluster has a leader.
    pub(super) async fn reconcile_auth(
        &self,
        prev: &EtcdClusterStatus,
        view: Option<&ClusterView>,
        root_refused: bool,
    ) -> AuthReport {
        let secret = self.root_secret_name();
        if root_refused && self.ec.spec.auth.is_some() {
            return AuthReport {
                enabled: Some(true),
                condition: Some((
                    false,
                    "RootPasswordRefused",
                    format!(
                        "auth is on but the members refuse root's password from Secret {secret}"
                    ),
                )),
            };
        }
        let unchanged = AuthReport {
            enabled: prev.auth_enabled,
            condition: None,
        };
        let Some(view) = view.filter(|v| v.leader.is_some()) else {
            return unchanged;
        };
        let members = self.members_of(view);
        let on = match members.auth_enabled().await {
            Ok(on) => on,
            Err(e) => {
                return AuthReport {
                    enabled: prev.auth_enabled,
                    condition: self
                        .ec
                        .spec
                        .auth
                        .as_ref()
                        .map(|_| (false, "Unknown", format!("asking whether auth is on: {e}"))),
                }
            }
        };
        let Some(spec) = &self.ec.spec.auth else {
            return AuthReport {
                enabled: Some(on),
                condition: None,
            };
        };
        let done = |on: bool, msg: String| AuthReport {
            enabled: Some(on),
            condition: Some((true, if on { "Enabled" } else { "Disabled" }, msg)),
        };
        let failed = |on: bool, reason: &'static str, msg: String| AuthReport {
            enabled: Some(on),
            condition: Some((false, reason, msg)),
        };
        match (spec.enabled, on) {
            (true, true) => {
                // The operator's own calls must get in as root.
                if self.access.root_password.is_none() {
                    return failed(
                        true,
                        "RootSecretMissing",
                        format!("auth is on but Secret {secret} with key `password` is not found: the operator cannot change membership"),
                    );
                }
                // The view came from calls made with root's password, which the members took
                // (a refused password is reported above): root gets in.
                done(
                    true,
                    format!("auth is on; the operator calls the members as root (password in Secret {secret})"),
                )
            }
            (true, false) => {
                let Some(password) = &self.access.root_password else {
                    return failed(
                        false,
                        "RootSecretMissing",
                        format!("Secret {secret} with key `password` not found"),
                    );
                };
                let old: Vec<String> = view
                    .members
                    .iter()
                    .filter(|m| {
                        m.version.as_ref().is_none_or(|v| {
                            crate::status::release_cmp(&v.release, AUTH_SINCE).is_lt()
                        })
                    })
                    .map(|m| m.name.clone())
                    .collect();
                if !old.is_empty() {
                    return failed(
                        false,
                        "WaitingForMembers",
                        format!(
                            "auth is turned on once every member runs cairn {AUTH_SINCE} or later, which applies auth changes; not yet: {}",
                            old.join(", ")
                        ),
                    );
                }
                match members.enable_auth(password).await {
                    Ok(()) => {
                        self.event(
                            EventType::Normal,
                            "AuthEnabled",
                            "Auth",
                            format!("made root (or set its password) from Secret {secret}, granted it the root role and enabled auth"),
                        )
                        .await;
                        done(
                            true,
                            format!("auth is on; the operator calls the members as root (password in Secret {secret})"),
                        )
                    }
                    Err(e) => failed(false, "EnableFailed", e.to_string()),
                }
            }
            (false, true) => match members.disable_auth().await {
                Ok(()) => {
                    self.event(
                        EventType::Normal,
                        "AuthDisabled",
                        "Auth",
                        "disabled auth (users and roles are kept)".to_string(),
                    )
                    .await;
                    done(false, "auth is off".to_string())
                }
                Err(e) => failed(true, "DisableFailed", e.to_string()),
            },
            (false, false) => done(false, "auth is off".to_string()),
        }
    }
}
