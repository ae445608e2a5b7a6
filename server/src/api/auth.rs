//! etcdserverpb.Auth: authentication is never enabled on cairn, and it
//! keeps no users or roles. What etcd answers with auth disabled and no
//! users is answered the same way (empty lists, `auth disable` accepted,
//! `auth enable` refused for want of a root user, `authenticate` refused as
//! not enabled, any named user or role not found); creating a user or a role
//! is refused as unsupported rather than accepted and ignored.

use std::sync::Arc;

use tonic::{Request, Response, Status};

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
use crate::server::EtcdServer;

pub struct AuthService {
    s: Arc<EtcdServer>,
}

impl AuthService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self { s }
    }

    /// What every auth request goes through first: refused on a learner,
    /// and (as etcd's go through Raft) answered only with a leader.
    async fn admit(&self) -> Result<Option<ResponseHeader>, Status> {
        self.s.not_learner()?;
        self.s.read_index().await?;
        Ok(Some(self.s.header(0)))
    }
}

type Answer<T> = Result<Response<T>, Status>;

fn unsupported() -> Status {
    Error::Unsupported("users and roles are not supported".into()).into()
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, _: Request<AuthEnableRequest>) -> Answer<AuthEnableResponse> {
        self.admit().await?;
        Err(Error::RootUserNotExist.into())
    }

    async fn auth_disable(&self, _: Request<AuthDisableRequest>) -> Answer<AuthDisableResponse> {
        let header = self.admit().await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(&self, _: Request<AuthStatusRequest>) -> Answer<AuthStatusResponse> {
        let header = self.admit().await?;
        Ok(Response::new(AuthStatusResponse {
            header,
            enabled: false,
            // A new etcd auth store is at revision 1 (its first commit).
            auth_revision: 1,
        }))
    }

    async fn authenticate(&self, _: Request<AuthenticateRequest>) -> Answer<AuthenticateResponse> {
        self.admit().await?;
        Err(Error::AuthNotEnabled.into())
    }

    async fn user_add(&self, req: Request<AuthUserAddRequest>) -> Answer<AuthUserAddResponse> {
        self.admit().await?;
        if req.get_ref().name.is_empty() {
            return Err(Error::UserEmpty.into());
        }
        Err(unsupported())
    }

    async fn user_get(&self, _: Request<AuthUserGetRequest>) -> Answer<AuthUserGetResponse> {
        self.admit().await?;
        Err(Error::UserNotFound.into())
    }

    async fn user_list(&self, _: Request<AuthUserListRequest>) -> Answer<AuthUserListResponse> {
        let header = self.admit().await?;
        Ok(Response::new(AuthUserListResponse {
            header,
            users: Vec::new(),
        }))
    }

    async fn user_delete(
        &self,
        _: Request<AuthUserDeleteRequest>,
    ) -> Answer<AuthUserDeleteResponse> {
        self.admit().await?;
        Err(Error::UserNotFound.into())
    }

    async fn user_change_password(
        &self,
        _: Request<AuthUserChangePasswordRequest>,
    ) -> Answer<AuthUserChangePasswordResponse> {
        self.admit().await?;
        Err(Error::UserNotFound.into())
    }

    async fn user_grant_role(
        &self,
        _: Request<AuthUserGrantRoleRequest>,
    ) -> Answer<AuthUserGrantRoleResponse> {
        self.admit().await?;
        Err(Error::UserNotFound.into())
    }

    async fn user_revoke_role(
        &self,
        _: Request<AuthUserRevokeRoleRequest>,
    ) -> Answer<AuthUserRevokeRoleResponse> {
        self.admit().await?;
        Err(Error::UserNotFound.into())
    }

    async fn role_add(&self, req: Request<AuthRoleAddRequest>) -> Answer<AuthRoleAddResponse> {
        self.admit().await?;
        if req.get_ref().name.is_empty() {
            return Err(Error::RoleEmpty.into());
        }
        Err(unsupported())
    }

    async fn role_get(&self, _: Request<AuthRoleGetRequest>) -> Answer<AuthRoleGetResponse> {
        self.admit().await?;
        Err(Error::RoleNotFound.into())
    }

    async fn role_list(&self, _: Request<AuthRoleListRequest>) -> Answer<AuthRoleListResponse> {
        let header = self.admit().await?;
        Ok(Response::new(AuthRoleListResponse {
            header,
            roles: Vec::new(),
        }))
    }

    async fn role_delete(
        &self,
        _: Request<AuthRoleDeleteRequest>,
    ) -> Answer<AuthRoleDeleteResponse> {
        self.admit().await?;
        Err(Error::RoleNotFound.into())
    }

    async fn role_grant_permission(
        &self,
        _: Request<AuthRoleGrantPermissionRequest>,
    ) -> Answer<AuthRoleGrantPermissionResponse> {
        self.admit().await?;
        Err(Error::RoleNotFound.into())
    }

    async fn role_revoke_permission(
        &self,
        _: Request<AuthRoleRevokePermissionRequest>,
    ) -> Answer<AuthRoleRevokePermissionResponse> {
        self.admit().await?;
        Err(Error::RoleNotFound.into())
    }
}
