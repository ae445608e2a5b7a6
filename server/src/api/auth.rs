//! etcdserverpb.Auth: etcd's users, roles and permissions (`crate::auth`).
//! Changes go through Raft and are checked where applied (root only once
//! auth is on); passwords are hashed here, on the member that received
//! them, so neither the log nor a snapshot ever holds one in clear. Gets and
//! lists are answered from this member's state after a read-index round.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::auth::{self, AuthInfo};
use crate::error::Error;
use crate::proto::etcdserverpb::{
    auth_server::Auth, AuthDisableRequest, AuthDisableResponse, AuthEnableRequest,
    AuthEnableResponse, AuthRoleAddRequest, AuthRoleAddResponse, AuthRoleDeleteRequest,
    AuthRoleDeleteResponse, AuthRoleGetRequest, AuthRoleGetResponse,
    AuthRoleGrantPermissionRequest, AuthRoleGrantPermissionResponse, AuthRoleListRequest,
    AuthRoleListResponse, AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse,
    AuthStatusRequest, AuthStatusResponse, AuthUserAddRequest, AuthUserAddResponse,
    AuthUserChangePasswordRequest, AuthUserChangePasswordResponse, AuthUserDeleteRequest,
    AuthUserDeleteResponse, AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest,
    AuthUserGrantRoleResponse, AuthUserListRequest, AuthUserListResponse,
    AuthUserRevokeRoleRequest, AuthUserRevokeRoleResponse, AuthenticateRequest,
    AuthenticateResponse, ResponseHeader,
};
use crate::proto::raftpb::{internal_request::Request as Internal, InternalAuthenticate};
use crate::server::EtcdServer;

pub struct AuthService {
    s: Arc<EtcdServer>,
    /// Password checks at once: bcrypt costs tens of milliseconds of CPU by
    /// design, and callers of Authenticate need no credentials to ask.
    checks: Arc<tokio::sync::Semaphore>,
}

type Answer<T> = Result<Response<T>, Status>;

impl AuthService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            s,
            checks: Arc::new(tokio::sync::Semaphore::new(cpus)),
        }
    }

    /// A hash a client sent instead of a password (etcd 3.5's
    /// `hashedPassword`): a bcrypt hash no costlier than `--bcrypt-cost`, or
    /// every login of that user would cost whatever it says.
    fn check_hash(&self, hash: &str) -> Result<(), Status> {
        let max = self.s.cfg.bcrypt_cost.max(auth::DEFAULT_BCRYPT_COST);
        match auth::hash_cost(hash) {
            Some(c) if c <= max => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "hashed password is not a bcrypt hash of cost {max} or less"
            ))
            .into()),
        }
    }

    /// Proposes an auth change by the caller of `req`; the header once applied.
    async fn change<T>(
        &self,
        req: &Request<T>,
        change: Internal,
    ) -> Result<Option<ResponseHeader>, Status> {
        let ai = super::caller(&self.s, req).await?;
        self.s.propose_auth(change, ai.as_ref()).await?;
        Ok(Some(self.s.header(0)))
    }

    /// For gets and lists: the caller, once this member has applied
    /// everything committed before the call.
    async fn reader<T>(&self, req: &Request<T>) -> Result<Option<AuthInfo>, Status> {
        self.s.not_learner()?;
        let ai = super::caller(&self.s, req).await?;
        self.s.read_index().await?;
        Ok(ai)
    }

    /// A password hashed at `--bcrypt-cost`, off the async threads; only for
    /// an admin (hashing costs tens of milliseconds by design).
    async fn hash<T>(&self, req: &Request<T>, password: String) -> Result<String, Status> {
        let ai = super::caller(&self.s, req).await?;
        self.s.check_admin(ai.as_ref())?;
        let cost = self.s.cfg.bcrypt_cost;
        let hashed = tokio::task::spawn_blocking(move || auth::hash_password(&password, cost))
            .await
            .map_err(Error::internal)??;
        Ok(hashed)
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, req: Request<AuthEnableRequest>) -> Answer<AuthEnableResponse> {
        let header = self
            .change(&req, Internal::AuthEnable(AuthEnableRequest {}))
            .await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(&self, req: Request<AuthDisableRequest>) -> Answer<AuthDisableResponse> {
        let header = self
            .change(&req, Internal::AuthDisable(AuthDisableRequest {}))
            .await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(&self, req: Request<AuthStatusRequest>) -> Answer<AuthStatusResponse> {
        let ai = self.reader(&req).await?;
        self.s.check_admin(ai.as_ref())?;
        // The header first: it reads the key space, which is locked before
        // the auth state where both are (applying).
        let header = Some(self.s.header(0));
        let (enabled, auth_revision) = {
            let store = self.s.state.auth.store.read();
            (store.enabled(), store.revision())
        };
        Ok(Response::new(AuthStatusResponse {
            header,
            enabled,
            auth_revision,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Answer<AuthenticateResponse> {
        self.s.not_learner()?;
        self.s.read_index().await?;
        let r = req.into_inner();
        loop {
            // Checked here (bcrypt is slow by design), then proposed so that
            // every member knows the token; checked again if the auth state
            // changed meanwhile (the password may have).
            let (hash, checked) = self.s.state.auth.store.read().password_of(&r.name)?;
            let password = r.password.clone();
            let permit = self.checks.clone().acquire_owned().await;
            let ok = tokio::task::spawn_blocking(move || auth::password_matches(&password, &hash))
                .await
                .map_err(Error::internal)?;
            drop(permit);
            if !ok {
                return Err(Error::AuthFailed.into());
            }
            let simple_token = self.s.state.auth.tokens().prefix();
            let change = Internal::Authenticate(InternalAuthenticate {
                name: r.name.clone(),
                simple_token,
            });
            let token = self.s.propose_auth(change, None).await?;
            if checked == self.s.state.auth.store.read().revision() {
                return Ok(Response::new(AuthenticateResponse {
                    header: Some(self.s.header(0)),
                    token,
                }));
            }
        }
    }

    async fn user_add(&self, req: Request<AuthUserAddRequest>) -> Answer<AuthUserAddResponse> {
        let no_password = req
            .get_ref()
            .options
            .as_ref()
            .is_some_and(|o| o.no_password);
        let mut r = req.get_ref().clone();
        if !r.hashed_password.is_empty() {
            self.check_hash(&r.hashed_password)?;
        } else if !r.name.is_empty() && !no_password {
            r.hashed_password = self.hash(&req, std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        let header = self.change(&req, Internal::UserAdd(r)).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(&self, req: Request<AuthUserGetRequest>) -> Answer<AuthUserGetResponse> {
        let ai = self.reader(&req).await?;
        let name = &req.get_ref().name;
        // Users may read themselves; anyone else needs root.
        if ai.as_ref().is_none_or(|a| a.user != *name) {
            self.s.check_admin(ai.as_ref())?;
        }
        let header = Some(self.s.header(0));
        let roles = self
            .s
            .state
            .auth
            .store
            .read()
            .user(name)
            .map(|u| u.roles.clone());
        Ok(Response::new(AuthUserGetResponse {
            header,
            roles: roles.ok_or(Error::UserNotFound)?,
        }))
    }

    async fn user_list(&self, req: Request<AuthUserListRequest>) -> Answer<AuthUserListResponse> {
        let ai = self.reader(&req).await?;
        self.s.check_admin(ai.as_ref())?;
        let header = Some(self.s.header(0));
        let users = self.s.state.auth.store.read().user_names();
        Ok(Response::new(AuthUserListResponse { header, users }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Answer<AuthUserDeleteResponse> {
        let r = Internal::UserDelete(req.get_ref().clone());
        let header = self.change(&req, r).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Answer<AuthUserChangePasswordResponse> {
        let mut r = req.get_ref().clone();
        if !r.hashed_password.is_empty() {
            self.check_hash(&r.hashed_password)?;
        } else {
            r.hashed_password = self.hash(&req, std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        let header = self.change(&req, Internal::UserChangePassword(r)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Answer<AuthUserGrantRoleResponse> {
        let r = Internal::UserGrantRole(req.get_ref().clone());
        let header = self.change(&req, r).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Answer<AuthUserRevokeRoleResponse> {
        let r = Internal::UserRevokeRole(req.get_ref().clone());
        let header = self.change(&req, r).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, req: Request<AuthRoleAddRequest>) -> Answer<AuthRoleAddResponse> {
        let r = Internal::RoleAdd(req.get_ref().clone());
        let header = self.change(&req, r).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, req: Request<AuthRoleGetRequest>) -> Answer<AuthRoleGetResponse> {
        let ai = self.reader(&req).await?;
        let role = &req.get_ref().role;
        let header = Some(self.s.header(0));
        let perm = {
            let store = self.s.state.auth.store.read();
            // Users may read the roles they have; other roles need root.
            if !ai.as_ref().is_some_and(|a| store.has_role(&a.user, role)) {
                store.check_admin(ai.as_ref())?;
            }
            store.role(role).map(|r| r.key_permission.clone())
        };
        Ok(Response::new(AuthRoleGetResponse {
            header,
            perm: perm.ok_or(Error::RoleNotFound)?,
        }))
    }

    async fn role_list(&self, req: Request<AuthRoleListRequest>) -> Answer<AuthRoleListResponse> {
        let ai = self.reader(&req).await?;
        self.s.check_admin(ai.as_ref())?;
        let header = Some(self.s.header(0));
        let roles = self.s.state.auth.store.read().role_names();
        Ok(Response::new(AuthRoleListResponse { header, roles }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Answer<AuthRoleDeleteResponse> {
        let r = Internal::RoleDelete(req.get_ref().clone());
        let header = self.change(&req, r).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Answer<AuthRoleGrantPermissionResponse> {
        let r = Internal::RoleGrantPermission(req.get_ref().clone());
        let header = self.change(&req, r).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Answer<AuthRoleRevokePermissionResponse> {
        let r = Internal::RoleRevokePermission(req.get_ref().clone());
        let header = self.change(&req, r).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
