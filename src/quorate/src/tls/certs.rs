//! `quorate certs`: a cluster CA and the certificates it issues.
//!
//! A certificate's identity is its one `quorate://` URI subject alternative
//! name ([`quorate_core::access::Identity::uri`]); the common name repeats
//! the name for people reading it and is never used for access. Keys are
//! ECDSA P-256, written mode 0600; every file is written to a temporary name
//! and renamed, so a process reloading certificates never reads half a file
//! (re-issuing under the same name is how certificates are rotated).

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use quorate_core::access::{ANY_GROUP, Identity, Role};
use quorate_core::names::{self, NameKind};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;

use super::config::TlsFiles;

/// The CA's certificate, in the certificates directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA's private key, in the certificates directory.
pub const CA_KEY: &str = "ca.key";
/// How long a CA is valid unless told otherwise.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long an issued certificate is valid unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// The most `--san` entries one certificate may carry.
pub const MAX_SANS: usize = 32;

/// Why a CA or certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "{0} already exists: a directory holds one CA (delete it to start over, which invalidates every certificate it issued)"
    )]
    CaExists(String),
    #[error("{path}: {message}")]
    BadFile { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.display().to_string(), source }
}

/// What `quorate certs issue` was asked for.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The file name (`NAME.crt`, `NAME.key`) and the identity's name; for
    /// a node, `node-N`.
    pub name: String,
    /// The identity's role.
    pub role: Role,
    /// A member's group (exactly one), or a client's groups (at least one;
    /// `*` for every group).
    pub groups: Vec<String>,
    /// DNS names and IP addresses the certificate is valid for as a server
    /// (a node's listen address).
    pub sans: Vec<String>,
    /// When it starts to be valid (now, normally).
    pub not_before: OffsetDateTime,
    /// When it stops being valid.
    pub not_after: OffsetDateTime,
}

impl IssueRequest {
    /// A request valid from now for [`DEFAULT_VALIDITY`].
    pub fn new(name: &str, role: Role) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            name: name.to_owned(),
            role,
            groups: Vec::new(),
            sans: Vec::new(),
            not_before: now - time::Duration::minutes(5),
            not_after: now + DEFAULT_VALIDITY,
        }
    }

    /// The identity the certificate will carry.
    pub fn identity(&self) -> Result<Identity, CertError> {
        let bad = |m: String| Err(CertError::Invalid(m));
        names::validate(NameKind::Holder, &self.name).map_err(|e| CertError::Invalid(format!("--name: {e}")))?;
        let groups_given = !self.groups.is_empty();
        match self.role {
            Role::Node => {
                let id = self.name.strip_prefix("node-").and_then(|n| n.parse::<u64>().ok());
                match id {
                    Some(id) if !groups_given => Ok(Identity::Node { id }),
                    Some(_) => bad("--group: a node certificate belongs to no group".into()),
                    None => {
                        bad(format!("--name: a node certificate is named node-N (its Raft id), not {:?}", self.name))
                    }
                }
            }
            Role::Member => match self.groups.as_slice() {
                [group] => {
                    names::validate(NameKind::Group, group).map_err(|e| CertError::Invalid(format!("--group: {e}")))?;
                    names::validate(NameKind::Member, &self.name)
                        .map_err(|e| CertError::Invalid(format!("--name: {e}")))?;
                    Ok(Identity::Member { group: group.clone(), member: self.name.clone() })
                }
                _ => bad("--group: a member certificate names exactly one group".into()),
            },
            Role::Client => {
                if !groups_given {
                    return bad("--group: a client certificate names the groups it may hold (or '*' for all)".into());
                }
                for g in self.groups.iter().filter(|g| g.as_str() != ANY_GROUP) {
                    names::validate(NameKind::Group, g).map_err(|e| CertError::Invalid(format!("--group: {e}")))?;
                }
                Ok(Identity::Client { name: self.name.clone(), groups: self.groups.clone() })
            }
            Role::Reader | Role::Admin if groups_given => {
                bad(format!("--group: a {} certificate belongs to no group", self.role))
            }
            Role::Reader => Ok(Identity::Reader { name: self.name.clone() }),
            Role::Admin => Ok(Identity::Admin { name: self.name.clone() }),
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    // The mode given to open() is filtered by the umask; set it exactly.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Creates a CA in `dir` (`ca.crt`, `ca.key`). Refuses to replace one.
pub fn init(dir: &Path) -> Result<PathBuf, CertError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for f in [CA_CERT, CA_KEY] {
        if dir.join(f).exists() {
            return Err(CertError::CaExists(dir.join(f).display().to_string()));
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A name of its own: a certificate from another quorate CA is then
    // refused as from an unknown issuer, not as a bad signature.
    let ca_name = format!("quorate cluster CA {:016x}", rand::random::<u64>());
    params.distinguished_name.push(DnType::CommonName, ca_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + CA_VALIDITY;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_atomic(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
    Ok(dir.join(CA_CERT))
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Issues `NAME.crt` and `NAME.key` in `dir`, signed by the CA there;
/// returns their paths. Replaces an earlier pair of the same name.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<(PathBuf, PathBuf), CertError> {
    let identity = req.identity()?;
    if req.sans.len() > MAX_SANS {
        return Err(CertError::Invalid(format!("--san: at most {MAX_SANS} names")));
    }
    let ca_key_path = dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)
        .map_err(|e| CertError::BadFile { path: ca_key_path.display().to_string(), message: e.to_string() })?;
    let ca_cert_path = dir.join(CA_CERT);
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, ca_key)
        .map_err(|e| CertError::BadFile { path: ca_cert_path.display().to_string(), message: e.to_string() })?;

    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, req.name.as_str());
    params.not_before = req.not_before;
    params.not_after = req.not_after;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every identity is a client of the cluster; nodes also serve (the API
    // and Raft share one port), and so may anything given a --san.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if identity.role() == Role::Node || !req.sans.is_empty() {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
    for san in &req.sans {
        params.subject_alt_names.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                san.as_str()
                    .try_into()
                    .map_err(|_| CertError::Invalid(format!("--san: {san:?} is not a DNS name or IP")))?,
            ),
        });
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (crt, key_path) = (dir.join(format!("{}.crt", req.name)), dir.join(format!("{}.key", req.name)));
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&crt, cert.pem().as_bytes(), 0o644)?;
    Ok((crt, key_path))
}

/// The certificates of a cluster on one machine (`quorate local up`,
/// `quorate demo`, the test harnesses): a CA and one certificate per
/// identity, all in one directory. Issued once and kept: a second `up` on
/// the same directory reuses what is there and issues only what is missing.
#[derive(Debug, Clone)]
pub struct LocalPki {
    dir: PathBuf,
}

/// The admin identity of a [`LocalPki`] (`admin.crt`).
pub const LOCAL_ADMIN: &str = "admin";
/// The reader identity of a [`LocalPki`] (`reader.crt`).
pub const LOCAL_READER: &str = "reader";
/// The client identity of a [`LocalPki`] (`client.crt`): leases of every
/// group, as `client` or `client@INSTANCE`.
pub const LOCAL_CLIENT: &str = "client";

impl LocalPki {
    /// Ensures `dir` holds a CA, `admin`, `reader` and `client` certificates, `node-N`
    /// for every node (valid as a server for its host), and one per member
    /// (`(group, member)`), issuing whatever is missing.
    pub fn ensure(dir: &Path, nodes: &[(u64, String)], members: &[(String, String)]) -> Result<Self, CertError> {
        for (_, m) in members {
            if m == LOCAL_ADMIN || m == LOCAL_READER || m == LOCAL_CLIENT || m.starts_with("node-") {
                return Err(CertError::Invalid(format!(
                    "member {m:?}: its certificate would share a file with the {m} identity; rename the member"
                )));
            }
        }
        if !dir.join(CA_CERT).exists() || !dir.join(CA_KEY).exists() {
            init(dir)?;
        }
        let pki = LocalPki { dir: dir.to_owned() };
        let mut client = IssueRequest::new(LOCAL_CLIENT, Role::Client);
        client.groups = vec![ANY_GROUP.into()];
        let mut wanted =
            vec![IssueRequest::new(LOCAL_ADMIN, Role::Admin), IssueRequest::new(LOCAL_READER, Role::Reader), client];
        for (id, host) in nodes {
            let mut r = IssueRequest::new(&format!("node-{id}"), Role::Node);
            r.sans = vec![host.clone()];
            wanted.push(r);
        }
        for (group, member) in members {
            let mut r = IssueRequest::new(member, Role::Member);
            r.groups = vec![group.clone()];
            wanted.push(r);
        }
        for r in wanted {
            let files = pki.files(&r.name);
            if !files.cert.exists() || !files.key.exists() {
                issue(dir, &r)?;
            }
        }
        Ok(pki)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA, certificate and key of identity `name` (`admin`, `reader`,
    /// `node-N` or a member id).
    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles::named(&self.dir, name)
    }

    /// Node `id`'s files.
    pub fn node(&self, id: u64) -> TlsFiles {
        self.files(&format!("node-{id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_each_role_and_refuses_what_makes_no_sense() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(matches!(init(dir.path()), Err(CertError::CaExists(_))), "a second CA over the first");
        let key_mode = std::fs::metadata(dir.path().join(CA_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);

        let mut node = IssueRequest::new("node-1", Role::Node);
        node.sans = vec!["127.0.0.1".into(), "localhost".into()];
        let (crt, key) = issue(dir.path(), &node).unwrap();
        assert!(read(&crt).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

        let mut member = IssueRequest::new("db-1", Role::Member);
        member.groups = vec!["pair".into()];
        assert_eq!(member.identity().unwrap().uri(), "quorate://member/pair/db-1");
        issue(dir.path(), &member).unwrap();

        let e = |r: IssueRequest| issue(dir.path(), &r).unwrap_err().to_string();
        assert!(e(IssueRequest::new("db-1", Role::Member)).contains("exactly one group"));
        assert!(e(IssueRequest::new("n1", Role::Node)).contains("named node-N"));
        assert!(e(IssueRequest::new("svc", Role::Client)).contains("'*' for all"));
        assert!(e(IssueRequest::new("a/b", Role::Admin)).starts_with("--name:"));
        let mut r = IssueRequest::new("r", Role::Reader);
        r.groups = vec!["g".into()];
        assert!(e(r).contains("belongs to no group"));
        let other = tempfile::tempdir().unwrap();
        assert!(
            issue(other.path(), &IssueRequest::new("ops", Role::Admin)).unwrap_err().to_string().contains("ca.key")
        );
    }
}
