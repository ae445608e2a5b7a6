//! Domain errors and their one mapping to gRPC statuses. The messages are
//! etcd's, byte for byte: clients (clientv3, kube-apiserver) match on them.

use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

/// Every error a cairn request can end with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: rpc not supported for learner")]
    NotSupportedForLearner,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: given member URLs are invalid")]
    BadUrls,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExist,
    #[error("etcdserver: member ID already exist")]
    MemberExist,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    /// A CORRUPT alarm is raised: the cluster serves nothing but maintenance (etcd's
    /// `ErrGRPCCorrupt`).
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// `--experimental-initial-corrupt-check` found this member's data differ from a peer's.
    #[error("{0}")]
    DataInconsistency(String),
    #[error("etcdserver: the member has been permanently removed from the cluster")]
    MemberRemoved,
    /// How a removed member stops: etcd's text after its ID (an operator reads the ID from the
    /// termination message to tell this member from a later one of the same name).
    #[error("member {0:x}: the member has been permanently removed from the cluster")]
    Removed(u64),
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// Errors etcd passes to clients unmapped, as gRPC Unknown with its auth
    /// package's text (a password given for a `--no-password` user; any auth
    /// error of Defragment, Snapshot, Hash and HashKV).
    #[error("{0}")]
    Unknown(String),
    #[error("etcdserver: {0}")]
    InvalidArgument(String),
    #[error("etcdserver: {0}")]
    Unsupported(String),
    /// A storage or internal failure; the message is for operators, not clients.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code etcd uses for this error (etcd `api/v3rpc/rpctypes`).
    pub fn code(&self) -> Code {
        use Error::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | InvalidSortOption | RequestTooLarge | BadUrls | UserEmpty | RoleEmpty
            | AuthFailed | PermissionNotGiven | InvalidAuthMgmt | AuthOldRevision
            | InvalidArgument(_) => Code::InvalidArgument,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            Unknown(_) => Code::Unknown,
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            NoSpace => Code::ResourceExhausted,
            Corrupt => Code::DataLoss,
            DataInconsistency(_) => Code::DataLoss,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExist
            | NotLeader
            | PeerUrlExist
            | MemberExist
            | MemberNotLearner
            | LearnerNotReady
            | TooManyLearners
            | NotEnoughStartedMembers
            | BadLeaderTransferee
            | AuthNotEnabled
            | RootUserNotExist
            | UserNotFound
            | RoleNotFound
            | RootRoleNotExist
            | UserAlreadyExist
            | RoleAlreadyExist
            | RoleNotGranted
            | PermissionNotGranted => Code::FailedPrecondition,
            NoLeader | LeaderChanged | Timeout | Unhealthy | MemberRemoved | Removed(_) => {
                Code::Unavailable
            }
            NotSupportedForLearner => Code::Unavailable,
            Unsupported(_) => Code::Unimplemented,
            Internal(_) => Code::Internal,
        }
    }

    /// The error another member answered with (through the peer service),
    /// recognised by its code and message.
    pub fn from_peer(status: &Status) -> Self {
        use Error::*;
        const KNOWN: &[Error] = &[
            EmptyKey,
            KeyNotFound,
            ValueProvided,
            LeaseProvided,
            TooManyOps,
            DuplicateKey,
            InvalidSortOption,
            Compacted,
            FutureRev,
            NoSpace,
            Corrupt,
            LeaseNotFound,
            LeaseExist,
            LeaseTtlTooLarge,
            RequestTooLarge,
            NoLeader,
            NotLeader,
            LeaderChanged,
            Timeout,
            NotSupportedForLearner,
            MemberNotFound,
            BadUrls,
            PeerUrlExist,
            MemberExist,
            MemberNotLearner,
            LearnerNotReady,
            TooManyLearners,
            NotEnoughStartedMembers,
            BadLeaderTransferee,
            Unhealthy,
            MemberRemoved,
            UserEmpty,
            UserNotFound,
            PermissionDenied,
            InvalidAuthToken,
            AuthOldRevision,
        ];
        if let Some(e) = KNOWN
            .iter()
            .find(|e| e.code() == status.code() && e.to_string() == status.message())
        {
            return e.clone();
        }
        let msg = status.message();
        match (status.code(), msg.strip_prefix("etcdserver: ")) {
            (Code::InvalidArgument, Some(m)) => InvalidArgument(m.to_string()),
            (Code::Unimplemented, Some(m)) => Unsupported(m.to_string()),
            // The leader could not be reached or did not answer in time.
            (Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled, _) => Timeout,
            _ => Internal(format!("peer: {msg}")),
        }
    }

    /// The text etcd's auth package gives this error (`auth: ...`), which
    /// Defragment, Snapshot, Hash and HashKV pass on unmapped as Unknown.
    pub fn raw_auth(self) -> Self {
        let text = match &self {
            Error::PermissionDenied => "auth: permission denied",
            Error::UserEmpty => "auth: user name is empty",
            Error::UserNotFound => "auth: user not found",
            Error::InvalidAuthToken => "auth: invalid auth token",
            Error::AuthOldRevision => "auth: revision in header is old",
            _ => return self,
        };
        Error::Unknown(text.into())
    }

    /// Wraps any storage-level failure.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
