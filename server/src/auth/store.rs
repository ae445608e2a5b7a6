//! The auth state machine: users, roles, their permissions, whether auth is
//! enabled and the auth revision, with etcd 3.4's rules and errors for every
//! change and check. Pure and deterministic: every member applies the same
//! changes to the same state; passwords arrive already hashed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::perms::UserPerms;
use super::AuthInfo;
use crate::error::{Error, Result};
use crate::proto::authpb::{Permission, Role, User, UserAddOptions};
use crate::proto::etcdserverpb::{
    request_op, AuthRoleGrantPermissionRequest, AuthUserAddRequest, DeleteRangeRequest, PutRequest,
    TxnRequest,
};
use crate::proto::raftpb::{internal_request::Request, AuthState};

/// The name of the user and role that may do everything.
pub const ROOT: &str = "root";

/// What an applied auth change answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthApplied {
    Done,
    /// Authenticate passed: the user, for the token to be assigned.
    Authenticated {
        user: String,
        revision: u64,
    },
}

/// The auth state of a member.
#[derive(Debug, Clone)]
pub struct AuthStore {
    enabled: bool,
    /// Bumped by every change to users, roles or permissions (and by
    /// disabling auth); tokens of an older revision are stale. A new store is
    /// at 1, as etcd's: 0 means "no user".
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    perms: HashMap<String, UserPerms>,
}

impl Default for AuthStore {
    fn default() -> Self {
        Self {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            perms: HashMap::new(),
        }
    }
}

fn name_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether a permission's range is one etcd accepts: a key, `[key, end)`
/// with `key < end`, or everything from `key` on (`end` = `"\0"`).
fn valid_range(key: &[u8], end: &[u8]) -> bool {
    !key.is_empty() && (end.is_empty() || key < end || end == b"\0")
}

impl AuthStore {
    /// The state as stored.
    pub fn from_state(s: AuthState) -> Self {
        let mut store = Self {
            enabled: s.enabled,
            revision: s.revision.max(1),
            users: s.users.into_iter().map(|u| (name_of(&u.name), u)).collect(),
            roles: s.roles.into_iter().map(|r| (name_of(&r.name), r)).collect(),
            perms: HashMap::new(),
        };
        store.refresh();
        store
    }

    /// The state to store (users and roles in name order).
    pub fn to_state(&self) -> AuthState {
        AuthState {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.values().cloned().collect(),
            roles: self.roles.values().cloned().collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn refresh(&mut self) {
        self.perms = self
            .users
            .iter()
            .map(|(name, u)| {
                let perms = u
                    .roles
                    .iter()
                    .filter_map(|r| self.roles.get(r))
                    .flat_map(|r| r.key_permission.iter());
                (name.clone(), UserPerms::merge(perms))
            })
            .collect();
    }

    fn commit(&mut self) {
        self.revision += 1;
        self.refresh();
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut User> {
        self.users.get_mut(name).ok_or(Error::UserNotFound)
    }

    /// Applies one auth change. Errors leave the state as it was.
    pub fn apply(&mut self, req: &Request) -> Result<AuthApplied> {
        match req {
            Request::AuthEnable(_) => {
                if !self.enabled {
                    let root = self.users.get(ROOT).ok_or(Error::RootUserNotExist)?;
                    if !has_root(root) {
                        return Err(Error::RootRoleNotExist);
                    }
                    self.enabled = true;
                    self.refresh();
                }
            }
            Request::AuthDisable(_) => {
                if self.enabled {
                    self.enabled = false;
                    self.commit();
                }
            }
            Request::Authenticate(a) => {
                if !self.enabled {
                    return Err(Error::AuthNotEnabled);
                }
                let u = self.users.get(&a.name).ok_or(Error::AuthFailed)?;
                if no_password(u) {
                    return Err(Error::AuthFailed);
                }
                return Ok(AuthApplied::Authenticated {
                    user: a.name.clone(),
                    revision: self.revision,
                });
            }
            Request::UserAdd(r) => self.user_add(r)?,
            Request::UserDelete(r) => {
                if self.enabled && r.name == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                self.users.remove(&r.name).ok_or(Error::UserNotFound)?;
                self.commit();
            }
            Request::UserChangePassword(r) => {
                let u = self.user_mut(&r.name)?;
                if !no_password(u) {
                    u.password = r.hashed_password.clone().into_bytes();
                }
                self.commit();
            }
            Request::UserGrantRole(r) => {
                if !self.users.contains_key(&r.user) {
                    return Err(Error::UserNotFound);
                }
                // etcd lets "root" be granted before a role of that name exists.
                if r.role != ROOT && !self.roles.contains_key(&r.role) {
                    return Err(Error::RoleNotFound);
                }
                let u = self.user_mut(&r.user)?;
                if !u.roles.contains(&r.role) {
                    u.roles.push(r.role.clone());
                    u.roles.sort();
                    self.commit();
                }
            }
            Request::UserRevokeRole(r) => {
                if self.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                let u = self.user_mut(&r.name)?;
                let before = u.roles.len();
                u.roles.retain(|x| *x != r.role);
                if u.roles.len() == before {
                    return Err(Error::RoleNotGranted);
                }
                self.commit();
            }
            Request::RoleAdd(r) => {
                if r.name.is_empty() {
                    return Err(Error::RoleEmpty);
                }
                if self.roles.contains_key(&r.name) {
                    return Err(Error::RoleAlreadyExist);
                }
                let role = Role {
                    name: r.name.clone().into_bytes(),
                    key_permission: Vec::new(),
                };
                self.roles.insert(r.name.clone(), role);
                self.commit();
            }
            Request::RoleDelete(r) => {
                if self.enabled && r.role == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                self.roles.remove(&r.role).ok_or(Error::RoleNotFound)?;
                for u in self.users.values_mut() {
                    u.roles.retain(|x| *x != r.role);
                }
                self.commit();
            }
            Request::RoleGrantPermission(r) => self.grant(r)?,
            Request::RoleRevokePermission(r) => {
                let role = self.roles.get_mut(&r.role).ok_or(Error::RoleNotFound)?;
                let before = role.key_permission.len();
                role.key_permission
                    .retain(|p| !(p.key == r.key && p.range_end == r.range_end));
                if role.key_permission.len() == before {
                    return Err(Error::PermissionNotGranted);
                }
                self.commit();
            }
            other => return Err(Error::Internal(format!("not an auth request: {other:?}"))),
        }
        Ok(AuthApplied::Done)
    }

    fn user_add(&mut self, r: &AuthUserAddRequest) -> Result<()> {
        if r.name.is_empty() {
            return Err(Error::UserEmpty);
        }
        if self.users.contains_key(&r.name) {
            return Err(Error::UserAlreadyExist);
        }
        let options = r.options.unwrap_or(UserAddOptions { no_password: false });
        let password = if options.no_password {
            Vec::new()
        } else {
            r.hashed_password.clone().into_bytes()
        };
        self.users.insert(
            r.name.clone(),
            User {
                name: r.name.clone().into_bytes(),
                password,
                roles: Vec::new(),
                options: Some(options),
            },
        );
        self.commit();
        Ok(())
    }

    fn grant(&mut self, r: &AuthRoleGrantPermissionRequest) -> Result<()> {
        let perm = r.perm.clone().ok_or(Error::PermissionNotGiven)?;
        if !valid_range(&perm.key, &perm.range_end) {
            return Err(Error::InvalidAuthMgmt);
        }
        let role = self.roles.get_mut(&r.name).ok_or(Error::RoleNotFound)?;
        let perms = &mut role.key_permission;
        // etcd's rule: only the first permission with the same key is
        // compared; the same range gets the new type, anything else is added.
        let i = perms.partition_point(|p| p.key < perm.key);
        match perms.get_mut(i) {
            Some(p) if p.key == perm.key && p.range_end == perm.range_end => {
                p.perm_type = perm.perm_type;
            }
            _ => {
                perms.push(perm);
                perms.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        self.commit();
        Ok(())
    }

    /// A user as stored.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// A role as stored.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// What Authenticate checks before proposing: the stored hash to verify
    /// the password against, and the revision it was read at.
    pub fn password_of(&self, name: &str) -> Result<(Vec<u8>, u64)> {
        if !self.enabled {
            return Err(Error::AuthNotEnabled);
        }
        let u = self.users.get(name).ok_or(Error::AuthFailed)?;
        if no_password(u) {
            return Err(Error::Unknown(
                "auth: authentication failed, password was given for no password user".into(),
            ));
        }
        Ok((u.password.clone(), self.revision))
    }

    /// etcd's IsAdminPermitted: anyone while auth is disabled, then only
    /// users with the root role.
    pub fn check_admin(&self, ai: Option<&AuthInfo>) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let ai = ai.filter(|a| !a.user.is_empty()).ok_or(Error::UserEmpty)?;
        let u = self.users.get(&ai.user).ok_or(Error::UserNotFound)?;
        if has_root(u) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// Whether `user` has `role` (or is root): RoleGet is open to them.
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// etcd's isOpPermitted for a range (`write`: may change it).
    pub fn check_range(
        &self,
        ai: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
        write: bool,
    ) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let ai = match ai {
            Some(ai) if ai.revision != 0 => ai,
            _ => return Err(Error::UserEmpty),
        };
        if ai.revision < self.revision {
            return Err(Error::AuthOldRevision);
        }
        let u = self.users.get(&ai.user).ok_or(Error::PermissionDenied)?;
        if has_root(u) {
            return Ok(());
        }
        let Some(p) = self.perms.get(&ai.user) else {
            return Err(Error::PermissionDenied);
        };
        let set = if write { &p.write } else { &p.read };
        let ok = if range_end.is_empty() {
            set.holds(key)
        } else {
            set.covers_range(key, range_end)
        };
        if ok {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// A put: write on the key, read on it for `prev_kv`, and write on every
    /// key already attached to its lease (unless root).
    pub fn check_put(
        &self,
        ai: Option<&AuthInfo>,
        p: &PutRequest,
        lease_keys: &dyn Fn(i64) -> Option<BTreeSet<Vec<u8>>>,
    ) -> Result<()> {
        self.check_range(ai, &p.key, &[], true)?;
        self.check_lease(ai, p.lease, lease_keys)?;
        if p.prev_kv {
            self.check_range(ai, &p.key, &[], false)?;
        }
        Ok(())
    }

    /// A lease's keys may be written by this user (etcd's checkLeasePuts).
    pub fn check_lease(
        &self,
        ai: Option<&AuthInfo>,
        lease: i64,
        lease_keys: &dyn Fn(i64) -> Option<BTreeSet<Vec<u8>>>,
    ) -> Result<()> {
        if !self.enabled || lease == 0 {
            return Ok(());
        }
        let Some(keys) = lease_keys(lease) else {
            return Ok(());
        };
        if self.check_admin(ai).is_ok() {
            return Ok(());
        }
        keys.iter()
            .try_for_each(|k| self.check_range(ai, k, &[], true))
    }

    fn check_delete(&self, ai: Option<&AuthInfo>, d: &DeleteRangeRequest) -> Result<()> {
        self.check_range(ai, &d.key, &d.range_end, true)?;
        if d.prev_kv {
            self.check_range(ai, &d.key, &d.range_end, false)?;
        }
        Ok(())
    }

    /// A txn: read on every compare's keys, and every operation of both
    /// branches (whichever runs), nested txns included.
    pub fn check_txn(
        &self,
        ai: Option<&AuthInfo>,
        t: &TxnRequest,
        lease_keys: &dyn Fn(i64) -> Option<BTreeSet<Vec<u8>>>,
    ) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        for c in &t.compare {
            self.check_range(ai, &c.key, &c.range_end, false)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    self.check_range(ai, &r.key, &r.range_end, false)?
                }
                Some(request_op::Request::RequestPut(p)) => self.check_put(ai, p, lease_keys)?,
                Some(request_op::Request::RequestDeleteRange(d)) => self.check_delete(ai, d)?,
                Some(request_op::Request::RequestTxn(t)) => self.check_txn(ai, t, lease_keys)?,
                None => {}
            }
        }
        Ok(())
    }

    /// The check of a key-space request applied from the log, by the user
    /// its proposer named.
    pub fn check_request(
        &self,
        ai: Option<&AuthInfo>,
        req: &Request,
        lease_keys: &dyn Fn(i64) -> Option<BTreeSet<Vec<u8>>>,
    ) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        match req {
            Request::Put(p) => self.check_put(ai, p, lease_keys),
            Request::DeleteRange(d) => self.check_delete(ai, d),
            Request::Txn(t) => self.check_txn(ai, t, lease_keys),
            Request::LeaseRevoke(r) => self.check_lease(ai, r.id, lease_keys),
            _ => Ok(()),
        }
    }
}

fn has_root(u: &User) -> bool {
    u.roles.iter().any(|r| r == ROOT)
}

fn no_password(u: &User) -> bool {
    u.options.as_ref().is_some_and(|o| o.no_password)
}

/// A permission as etcdctl grants it.
pub fn permission(perm_type: i32, key: &[u8], range_end: &[u8]) -> Permission {
    Permission {
        perm_type,
        key: key.to_vec(),
        range_end: range_end.to_vec(),
    }
}

/// Whether `req` changes the auth state (rather than the key space).
pub fn is_auth_request(req: &Request) -> bool {
    matches!(
        req,
        Request::AuthEnable(_)
            | Request::AuthDisable(_)
            | Request::Authenticate(_)
            | Request::UserAdd(_)
            | Request::UserDelete(_)
            | Request::UserChangePassword(_)
            | Request::UserGrantRole(_)
            | Request::UserRevokeRole(_)
            | Request::RoleAdd(_)
            | Request::RoleDelete(_)
            | Request::RoleGrantPermission(_)
            | Request::RoleRevokePermission(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::authpb::permission::Type;
    use crate::proto::etcdserverpb::{
        AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest,
        AuthUserDeleteRequest, AuthUserGrantRoleRequest,
    };
    use crate::proto::raftpb::InternalAuthenticate;

    fn user(name: &str) -> Request {
        Request::UserAdd(AuthUserAddRequest {
            name: name.into(),
            hashed_password: "$2a$04$hash".into(),
            ..Default::default()
        })
    }

    fn grant_role(user: &str, role: &str) -> Request {
        Request::UserGrantRole(AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        })
    }

    fn grant(role: &str, t: Type, key: &str, end: &str) -> Request {
        Request::RoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(permission(t as i32, key.as_bytes(), end.as_bytes())),
        })
    }

    fn ai(user: &str, revision: u64) -> AuthInfo {
        AuthInfo {
            user: user.into(),
            revision,
        }
    }

    #[test]
    fn enabling_needs_root_and_revisions_move_as_etcds() {
        let mut s = AuthStore::default();
        assert_eq!(s.revision(), 1);
        let enable = Request::AuthEnable(AuthEnableRequest {});
        assert_eq!(s.apply(&enable), Err(Error::RootUserNotExist));
        s.apply(&user(ROOT)).unwrap();
        assert_eq!(s.apply(&enable), Err(Error::RootRoleNotExist));
        // "root" may be granted before any role of that name exists.
        s.apply(&grant_role(ROOT, ROOT)).unwrap();
        assert_eq!(s.revision(), 3);
        // Granting it again changes nothing, not even the revision.
        s.apply(&grant_role(ROOT, ROOT)).unwrap();
        assert_eq!(s.revision(), 3);
        s.apply(&enable).unwrap();
        assert!(s.enabled());
        assert_eq!(s.revision(), 3, "enabling does not bump the revision");
        let del_root = Request::UserDelete(AuthUserDeleteRequest { name: ROOT.into() });
        assert_eq!(s.apply(&del_root), Err(Error::InvalidAuthMgmt));
        let del_role = Request::RoleDelete(AuthRoleDeleteRequest { role: ROOT.into() });
        assert_eq!(s.apply(&del_role), Err(Error::InvalidAuthMgmt));
        s.apply(&Request::AuthDisable(AuthDisableRequest {}))
            .unwrap();
        assert_eq!(s.revision(), 4, "disabling does");
        s.apply(&Request::AuthDisable(AuthDisableRequest {}))
            .unwrap();
        assert_eq!(s.revision(), 4, "unless already disabled");
        // The stored form gives the same store back.
        let again = AuthStore::from_state(s.to_state());
        assert_eq!(again.to_state(), s.to_state());
    }

    #[test]
    fn permissions_admin_and_stale_tokens() {
        let mut s = AuthStore::default();
        for r in [
            user(ROOT),
            grant_role(ROOT, ROOT),
            user("u"),
            Request::RoleAdd(AuthRoleAddRequest { name: "r".into() }),
            grant_role("u", "r"),
            grant("r", Type::Read, "k", ""),
            Request::AuthEnable(AuthEnableRequest {}),
        ] {
            s.apply(&r).unwrap();
        }
        let rev = s.revision();
        assert_eq!(s.check_range(Some(&ai("u", rev)), b"k", b"", false), Ok(()));
        assert_eq!(
            s.check_range(Some(&ai("u", rev)), b"k", b"", true),
            Err(Error::PermissionDenied)
        );
        // The same key again: its type is replaced, not added.
        s.apply(&grant("r", Type::Readwrite, "k", "")).unwrap();
        assert_eq!(s.role("r").unwrap().key_permission.len(), 1);
        let rev2 = s.revision();
        assert_eq!(
            s.check_range(Some(&ai("u", rev)), b"k", b"", true),
            Err(Error::AuthOldRevision)
        );
        assert_eq!(s.check_range(Some(&ai("u", rev2)), b"k", b"", true), Ok(()));
        assert_eq!(s.check_range(None, b"k", b"", false), Err(Error::UserEmpty));
        assert_eq!(
            s.check_range(Some(&ai("ghost", rev2)), b"k", b"", false),
            Err(Error::PermissionDenied)
        );
        assert_eq!(
            s.check_range(Some(&ai(ROOT, rev2)), b"any", b"\0", true),
            Ok(())
        );
        assert_eq!(
            s.check_admin(Some(&ai("u", rev2))),
            Err(Error::PermissionDenied)
        );
        assert_eq!(
            s.check_admin(Some(&ai("ghost", rev2))),
            Err(Error::UserNotFound)
        );
        assert_eq!(s.check_admin(None), Err(Error::UserEmpty));
        assert_eq!(s.check_admin(Some(&ai(ROOT, 0))), Ok(()));
        assert_eq!(
            s.apply(&grant("r", Type::Read, "b", "a")),
            Err(Error::InvalidAuthMgmt)
        );
        // Authenticate names the revision its token stands for.
        let auth = Request::Authenticate(InternalAuthenticate {
            name: "u".into(),
            simple_token: String::new(),
        });
        assert_eq!(
            s.apply(&auth),
            Ok(AuthApplied::Authenticated {
                user: "u".into(),
                revision: rev2
            })
        );
    }
}
