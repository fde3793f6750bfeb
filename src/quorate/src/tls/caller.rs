//! Who is calling, as a front door saw it, and the one enforcement of
//! `quorate_core::access::check` on it: every refusal is logged and counted
//! here, whichever door (the service layer, the Raft RPCs) asked.

use std::sync::atomic::{AtomicU64, Ordering};

use quorate_core::access::{Action, Denied, Identity, check};
use tracing::warn;

use super::transport::Peer;

/// Refusals since the process started (for metrics and tests).
static DENIALS: AtomicU64 = AtomicU64::new(0);

/// How many calls were refused since the process started.
pub fn denials() -> u64 {
    DENIALS.load(Ordering::Relaxed)
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Plain text (`--insecure`): nobody is identified and everything is
    /// allowed, as anyone who can reach the port can.
    Insecure,
    /// This process itself (a coordinator's own reports, in-process).
    Internal,
    /// A certificate from the cluster's CA, with this identity.
    Known(Identity),
    /// A connection whose identity cannot be used (why): a CA-signed
    /// certificate without a quorate identity, or no connection info.
    Unusable(String),
}

impl Caller {
    /// The caller on a connection `peer` describes (`None`: the request
    /// came without connection info, which only a misbuilt server does).
    pub fn of(peer: Option<&Peer>) -> Self {
        match peer {
            None => Caller::Unusable("the request carries no connection information".into()),
            Some(Peer { identity: None, .. }) => Caller::Insecure,
            Some(Peer { identity: Some(Ok(id)), .. }) => Caller::Known(id.clone()),
            Some(Peer { identity: Some(Err(e)), .. }) => Caller::Unusable(e.to_string()),
        }
    }

    /// The caller of a gRPC request.
    pub fn of_request<T>(req: &tonic::Request<T>) -> Self {
        Self::of(Peer::of_request(req))
    }

    /// May this caller do `action`? A refusal is logged and counted.
    pub fn check(&self, action: Action<'_>) -> Result<(), Denied> {
        let res = match self {
            Caller::Insecure | Caller::Internal => Ok(()),
            Caller::Known(id) => check(id, action),
            Caller::Unusable(why) => {
                Err(Denied { identity: "an unidentified caller".into(), action: action.to_string(), why: why.clone() })
            }
        };
        if let Err(d) = &res {
            DENIALS.fetch_add(1, Ordering::Relaxed);
            warn!("permission denied: {d}");
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::IdentityError;

    #[test]
    fn each_kind_of_caller() {
        let before = denials();
        let reader = Caller::of(Some(&Peer { addr: None, identity: Some(Ok(Identity::Reader { name: "r".into() })) }));
        assert!(reader.check(Action::Read).is_ok());
        let e = reader.check(Action::Steer).unwrap_err().to_string();
        assert_eq!(e, "reader r may not switch over, set maintenance or lift a failover block: admin only");
        assert!(Caller::of(Some(&Peer { addr: None, identity: None })).check(Action::Steer).is_ok(), "plain text");
        assert!(Caller::Internal.check(Action::Raft).is_ok());
        let bad = Caller::of(Some(&Peer { addr: None, identity: Some(Err(IdentityError::Missing)) }));
        assert!(bad.check(Action::Read).unwrap_err().to_string().contains("no quorate:// URI"));
        assert!(Caller::of(None).check(Action::Read).is_err());
        assert!(denials() >= before + 3, "each refusal is counted");
    }
}
