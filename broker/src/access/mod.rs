//! Users, vhosts and permissions, with RabbitMQ's model: who may log in
//! (password hashes in RabbitMQ's format, [`password`]), which vhosts
//! exist, and what each user may do in each vhost ([`perm`]).
//!
//! The state is read on every login, `connection.open` and checked
//! operation, and changed rarely: it sits behind a std `RwLock` that is
//! never held across a store write. A change is made on a copy under the
//! change mutex, stored as records (synced) with no read lock held, then
//! swapped in; [`Access::generation`] counts the changes, so that a
//! connection may memoise a check and know when it is stale.
//!
//! Stored as records of the meta store, values in JSON: kind `user` (key:
//! name), `vhost` (name), `permission` (vhost NUL user), `topic_permission`
//! (vhost NUL user NUL exchange), and `node`/`initialized`, written once the
//! node has its first users (so a node whose users were all deleted does
//! not get `guest` back at its next start).

pub mod limits;
pub mod password;
pub mod perm;

pub use limits::Limits;
pub use perm::{Kind, Perm, Permission, TopicPermission};

use crate::error::{AmqpError, AmqpResult};
use crate::policy::{Policies, Policy};
use password::Algorithm;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use warren_protocol::reply;
use warren_storage::{MetaStore, Record, RecordOp};

/// The user tags RabbitMQ knows.
pub const TAGS: [&str; 5] = [
    "administrator",
    "monitoring",
    "management",
    "policymaker",
    "impersonator",
];

#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    /// base64, RabbitMQ's format; empty: no password login.
    pub password_hash: String,
    pub algorithm: Algorithm,
    pub tags: Vec<String>,
    pub limits: Limits,
}

impl User {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct VhostMeta {
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub limits: Limits,
}

/// Everything access control knows.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub users: BTreeMap<String, User>,
    pub vhosts: BTreeMap<String, VhostMeta>,
    /// By (vhost, user).
    pub permissions: BTreeMap<(String, String), Permission>,
    /// By (vhost, user, exchange).
    pub topic_permissions: BTreeMap<(String, String, String), TopicPermission>,
    /// Policies by (vhost, name).
    pub policies: BTreeMap<(String, String), Arc<Policy>>,
    /// Operator policies by (vhost, name).
    pub operator_policies: BTreeMap<(String, String), Arc<Policy>>,
}

impl State {
    /// The policies and operator policies of `vhost`, ready to apply.
    pub fn policies_of(&self, vhost: &str) -> Policies {
        let of = |m: &BTreeMap<(String, String), Arc<Policy>>| {
            m.iter()
                .filter(|((v, _), _)| v == vhost)
                .map(|(_, p)| p.clone())
                .collect::<Vec<_>>()
        };
        Policies::new(of(&self.policies), of(&self.operator_policies))
    }

    /// Whether `user` has any topic permission in `vhost` (publishes to
    /// topic exchanges need a routing-key check only then).
    pub fn has_topic_permissions(&self, vhost: &str, user: &str) -> bool {
        self.topic_permissions
            .range((vhost.to_owned(), user.to_owned(), String::new())..)
            .next()
            .is_some_and(|((v, u, _), _)| v == vhost && u == user)
    }
}

/// Why a login was refused (for the log; the client is told less).
#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    NoSuchUser(String),
    BadPassword(String),
    LoopbackOnly(String),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::NoSuchUser(u) => write!(f, "user '{u}' - invalid credentials"),
            LoginError::BadPassword(u) => write!(f, "user '{u}' - invalid credentials"),
            LoginError::LoopbackOnly(u) => write!(f, "user '{u}' can only connect via localhost"),
        }
    }
}

pub struct Access {
    state: RwLock<Arc<State>>,
    /// Serialises changes (see the module comment).
    changes: Mutex<()>,
    generation: AtomicU64,
    store: Arc<dyn MetaStore>,
    /// Users who may connect only from a loopback address.
    loopback_users: Vec<String>,
    /// Connections and channels in use, against the limits.
    usage: Arc<limits::Usage>,
}

// ---------------------------------------------------------------- records

const USER: &str = "user";
const VHOST: &str = "vhost";
const PERMISSION: &str = "permission";
const TOPIC_PERMISSION: &str = "topic_permission";
const POLICY: &str = "policy";
const OPERATOR_POLICY: &str = "operator_policy";
const NODE: &str = "node";
const INITIALIZED: &str = "initialized";
/// This node's records were added to its cluster's (see `replicate`).
const ADOPTED: &str = "adopted";
/// This node's exchanges and queues were added to its cluster's.
const TOPOLOGY_ADOPTED: &str = "topology_adopted";

/// The kinds of records a cluster shares (every one but this node's own
/// `node` records).
pub const REPLICATED_KINDS: [&str; 6] = [
    USER,
    VHOST,
    PERMISSION,
    TOPIC_PERMISSION,
    POLICY,
    OPERATOR_POLICY,
];

#[derive(Serialize, Deserialize)]
struct UserRec {
    password_hash: String,
    hashing_algorithm: String,
    tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    limits: Limits,
}

#[derive(Serialize, Deserialize)]
struct VhostRec {
    description: String,
    tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    limits: Limits,
}

#[derive(Serialize, Deserialize)]
struct PermRec {
    configure: String,
    write: String,
    read: String,
}

#[derive(Serialize, Deserialize)]
struct PolicyRec {
    pattern: String,
    #[serde(rename = "apply-to")]
    apply_to: String,
    priority: i64,
    definition: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct TopicRec {
    write: String,
    read: String,
}

fn put(kind: &str, key: String, value: &impl Serialize) -> RecordOp {
    RecordOp::Put(Record {
        kind: kind.to_owned(),
        key,
        value: serde_json::to_vec(value).expect("records serialise").into(),
    })
}

fn del(kind: &str, key: String) -> RecordOp {
    RecordOp::Delete {
        kind: kind.to_owned(),
        key,
    }
}

fn perm_key(vhost: &str, user: &str) -> String {
    format!("{vhost}\0{user}")
}

fn topic_key(vhost: &str, user: &str, exchange: &str) -> String {
    format!("{vhost}\0{user}\0{exchange}")
}

fn user_op(u: &User) -> RecordOp {
    put(
        USER,
        u.name.clone(),
        &UserRec {
            password_hash: u.password_hash.clone(),
            hashing_algorithm: u.algorithm.name().to_owned(),
            tags: u.tags.clone(),
            limits: u.limits,
        },
    )
}

fn vhost_op(v: &VhostMeta) -> RecordOp {
    put(
        VHOST,
        v.name.clone(),
        &VhostRec {
            description: v.description.clone(),
            tags: v.tags.clone(),
            limits: v.limits,
        },
    )
}

/// A name for a user or vhost: not empty, no NUL (records key on it), at
/// most 255 bytes (an AMQP short string).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name must not be empty"));
    }
    if name.contains('\0') {
        return Err(format!(
            "{what} name '{}' contains a NUL byte",
            name.escape_debug()
        ));
    }
    if name.len() > 255 {
        return Err(format!("{what} name is longer than 255 bytes"));
    }
    Ok(())
}

fn check_tags(tags: &[String]) -> Result<(), String> {
    // RabbitMQ accepts any tag (plugins define their own); only the known
    // ones mean something here. Refuse only what cannot be a tag.
    for t in tags {
        if t.is_empty() || t.contains(',') {
            return Err(format!("invalid user tag '{t}'"));
        }
    }
    Ok(())
}

/// Read users, vhosts and permissions from `store`, and whether the node
/// was initialised (without changing anything).
pub fn read_state(store: &dyn MetaStore) -> Result<(State, bool), String> {
    let mut state = State::default();
    let mut initialized = false;
    let records = store
        .load_records()
        .map_err(|e| format!("cannot read users and permissions: {e}"))?;
    for r in records {
        let bad = |e: &dyn std::fmt::Display| {
            format!(
                "stored {} '{}' is corrupt: {e}",
                r.kind,
                r.key.escape_debug()
            )
        };
        match r.kind.as_str() {
            USER => {
                let u: UserRec = serde_json::from_slice(&r.value).map_err(|e| bad(&e))?;
                let algorithm =
                    Algorithm::parse(Some(&u.hashing_algorithm)).map_err(|e| bad(&e))?;
                state.users.insert(
                    r.key.clone(),
                    User {
                        name: r.key.clone(),
                        password_hash: u.password_hash,
                        algorithm,
                        tags: u.tags,
                        limits: u.limits,
                    },
                );
            }
            VHOST => {
                let v: VhostRec = serde_json::from_slice(&r.value).map_err(|e| bad(&e))?;
                state.vhosts.insert(
                    r.key.clone(),
                    VhostMeta {
                        name: r.key.clone(),
                        description: v.description,
                        tags: v.tags,
                        limits: v.limits,
                    },
                );
            }
            PERMISSION => {
                let p: PermRec = serde_json::from_slice(&r.value).map_err(|e| bad(&e))?;
                let (vhost, user) = r.key.split_once('\0').ok_or_else(|| bad(&"bad key"))?;
                let perm = Permission::new(&p.configure, &p.write, &p.read).map_err(|e| bad(&e))?;
                state
                    .permissions
                    .insert((vhost.to_owned(), user.to_owned()), perm);
            }
            TOPIC_PERMISSION => {
                let t: TopicRec = serde_json::from_slice(&r.value).map_err(|e| bad(&e))?;
                let mut parts = r.key.splitn(3, '\0');
                let (Some(v), Some(u), Some(x)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(bad(&"bad key"));
                };
                let tp = TopicPermission::new(&t.write, &t.read).map_err(|e| bad(&e))?;
                state
                    .topic_permissions
                    .insert((v.to_owned(), u.to_owned(), x.to_owned()), tp);
            }
            POLICY | OPERATOR_POLICY => {
                let p: PolicyRec = serde_json::from_slice(&r.value).map_err(|e| bad(&e))?;
                let (vhost, name) = r.key.split_once('\0').ok_or_else(|| bad(&"bad key"))?;
                let operator = r.kind == OPERATOR_POLICY;
                let policy = Policy::new(
                    vhost,
                    name,
                    &p.pattern,
                    &p.apply_to,
                    p.priority,
                    p.definition,
                    operator,
                )
                .map_err(|e| bad(&e))?;
                let map = if operator {
                    &mut state.operator_policies
                } else {
                    &mut state.policies
                };
                map.insert((vhost.to_owned(), name.to_owned()), Arc::new(policy));
            }
            NODE if r.key == INITIALIZED => initialized = true,
            _ => {} // a later version's kind: kept, not ours to read
        }
    }
    Ok((state, initialized))
}

impl Access {
    /// Load users, vhosts and permissions from `store`. A node never
    /// initialised gets `default_user` (administrator, full permissions on
    /// `/`) and the vhost `/`, unless `blank` is false (definitions are
    /// imported at boot instead).
    pub fn load(
        store: Arc<dyn MetaStore>,
        loopback_users: Vec<String>,
        default_user: Option<(&str, &str)>,
        blank: bool,
    ) -> Result<Access, String> {
        let (state, initialized) = read_state(&*store)?;
        let access = Access {
            state: RwLock::new(Arc::new(state)),
            changes: Mutex::new(()),
            generation: AtomicU64::new(1),
            store,
            loopback_users,
            usage: Default::default(),
        };
        if !initialized {
            access.initialize(default_user.filter(|_| blank))?;
        }
        Ok(access)
    }

    /// First start: the vhost `/` and the default user, then mark the node
    /// initialised, all in one batch.
    fn initialize(&self, default_user: Option<(&str, &str)>) -> Result<(), String> {
        self.change(|s, ops| {
            if default_user.is_some() && !s.vhosts.contains_key("/") {
                add_vhost(s, ops, "/", "Default virtual host", vec![])?;
            }
            if let Some((name, pass)) = default_user {
                if !s.users.contains_key(name) {
                    let u = User {
                        name: name.to_owned(),
                        password_hash: password::hash(Algorithm::Sha256, pass),
                        algorithm: Algorithm::Sha256,
                        tags: vec!["administrator".into()],
                        limits: Limits::default(),
                    };
                    ops.push(user_op(&u));
                    s.users.insert(name.to_owned(), u);
                    set_permissions(s, ops, name, "/", ".*", ".*", ".*")?;
                    tracing::info!(user = name, "created the default user");
                }
            }
            ops.push(put(NODE, INITIALIZED.into(), &true));
            Ok(())
        })
    }

    /// A snapshot of the whole state (cheap: an `Arc`).
    pub fn snapshot(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Bumped by every change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Make a change: `f` edits a copy of the state and lists the records
    /// to write; they are stored (synced), then the copy replaces the state.
    /// Nothing changes if `f` or the store fails.
    pub fn change<T>(
        &self,
        f: impl FnOnce(&mut State, &mut Vec<RecordOp>) -> Result<T, String>,
    ) -> Result<T, String> {
        let _one_at_a_time = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (*self.snapshot()).clone();
        let mut ops = Vec::new();
        let out = f(&mut next, &mut ops)?;
        if !ops.is_empty() {
            self.store
                .apply_records(&ops)
                .map_err(|e| format!("cannot store the change: {e}"))?;
        }
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(out)
    }

    /// What `f` would change, without changing anything: its result and
    /// the records it would write (a clustered node replicates those).
    pub fn prepare<T>(
        &self,
        f: impl FnOnce(&mut State, &mut Vec<RecordOp>) -> Result<T, String>,
    ) -> Result<(T, Vec<RecordOp>), String> {
        let mut next = (*self.snapshot()).clone();
        let mut ops = Vec::new();
        let out = f(&mut next, &mut ops)?;
        Ok((out, ops))
    }

    /// This node's records of the kinds a cluster shares.
    pub fn shared_records(&self) -> Result<Vec<Record>, String> {
        Ok(self
            .store
            .load_records()
            .map_err(|e| format!("cannot read users and permissions: {e}"))?
            .into_iter()
            .filter(|r| REPLICATED_KINDS.contains(&r.kind.as_str()))
            .collect())
    }

    /// Whether access control is still exactly what a first start made:
    /// `default_user` (with its default password, administrator, full
    /// permissions on `/`) and the vhost `/`, or nothing at all; no
    /// policy, topic permission or limit. Such a node has no users of its
    /// own to bring to a cluster (a cluster that deleted `guest` does not
    /// get it back from a fresh node).
    pub fn is_pristine(&self, default_user: Option<(&str, &str)>) -> bool {
        let s = self.snapshot();
        if !(s.topic_permissions.is_empty()
            && s.policies.is_empty()
            && s.operator_policies.is_empty()
            && s.users.values().all(|u| u.limits.is_empty())
            && s.vhosts.values().all(|v| v.limits.is_empty()))
        {
            return false;
        }
        let Some((name, pass)) = default_user else {
            return s.users.is_empty() && s.permissions.is_empty();
        };
        let full = |p: &Permission| {
            [&p.configure, &p.write, &p.read]
                .iter()
                .all(|x| x.source == ".*")
        };
        s.users.len() == 1
            && s.users.get(name).is_some_and(|u| {
                u.tags == ["administrator"]
                    && password::verify(u.algorithm, &u.password_hash, pass.as_bytes())
            })
            && s.vhosts.keys().eq(["/"])
            && s.permissions.len() == 1
            && s.permissions
                .get(&("/".to_owned(), name.to_owned()))
                .is_some_and(full)
    }

    /// Whether this node's records were added to its cluster's already.
    pub fn adopted(&self) -> Result<bool, String> {
        self.node_flag(ADOPTED)
    }

    /// Record (or forget) that this node's records were added to its
    /// cluster's (a node's own record: never shared). Forgetting it
    /// forgets that its exchanges and queues were, too.
    pub fn set_adopted(&self, adopted: bool) -> Result<(), String> {
        if !adopted {
            self.set_node_flag(TOPOLOGY_ADOPTED, false)?;
        }
        self.set_node_flag(ADOPTED, adopted)
    }

    /// Whether this node's exchanges and queues were added to its
    /// cluster's already.
    pub fn topology_adopted(&self) -> Result<bool, String> {
        self.node_flag(TOPOLOGY_ADOPTED)
    }

    pub fn set_topology_adopted(&self, adopted: bool) -> Result<(), String> {
        self.set_node_flag(TOPOLOGY_ADOPTED, adopted)
    }

    fn node_flag(&self, key: &str) -> Result<bool, String> {
        Ok(self
            .store
            .load_records()
            .map_err(|e| format!("cannot read users and permissions: {e}"))?
            .iter()
            .any(|r| r.kind == NODE && r.key == key))
    }

    fn set_node_flag(&self, key: &str, on: bool) -> Result<(), String> {
        let op = match on {
            true => put(NODE, key.into(), &true),
            false => del(NODE, key.into()),
        };
        self.store
            .apply_records(&[op])
            .map_err(|e| format!("cannot store the change: {e}"))
    }

    /// Write records that came from the cluster, and take the state they
    /// make (read back from the store, so it is exactly what a restart
    /// would load).
    pub fn apply_shared(&self, ops: &[RecordOp]) -> Result<(), String> {
        let _one_at_a_time = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        self.store
            .apply_records(ops)
            .map_err(|e| format!("cannot store the change: {e}"))?;
        let (state, _) = read_state(&*self.store)?;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Check a password login from `loopback` (whether the peer is on a
    /// loopback address).
    pub fn login(&self, user: &str, pass: &[u8], loopback: bool) -> Result<(), LoginError> {
        let s = self.snapshot();
        let Some(u) = s.users.get(user) else {
            // Spend the time a real check takes: no user enumeration by timing.
            let _ = password::verify(Algorithm::Sha256, DUMMY_HASH, pass);
            return Err(LoginError::NoSuchUser(user.to_owned()));
        };
        if !password::verify(u.algorithm, &u.password_hash, pass) {
            return Err(LoginError::BadPassword(user.to_owned()));
        }
        if !loopback && self.loopback_users.iter().any(|l| l == user) {
            return Err(LoginError::LoopbackOnly(user.to_owned()));
        }
        Ok(())
    }

    /// A login by a verified client certificate (SASL EXTERNAL): the user it
    /// names must exist; no password is asked.
    pub fn login_external(&self, user: &str, loopback: bool) -> Result<(), LoginError> {
        if !self.snapshot().users.contains_key(user) {
            return Err(LoginError::NoSuchUser(user.to_owned()));
        }
        if !loopback && self.loopback_users.iter().any(|l| l == user) {
            return Err(LoginError::LoopbackOnly(user.to_owned()));
        }
        Ok(())
    }

    /// May `user` open a connection to `vhost`? 530 as RabbitMQ if not.
    pub fn check_vhost(&self, user: &str, vhost: &str) -> AmqpResult<()> {
        let s = self.snapshot();
        if !s.vhosts.contains_key(vhost) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("vhost {vhost} not found"),
            ));
        }
        if !s
            .permissions
            .contains_key(&(vhost.to_owned(), user.to_owned()))
        {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("access to vhost '{vhost}' refused for user '{user}'"),
            ));
        }
        Ok(())
    }

    /// Admit a connection of `user` to `vhost` under both's limits (530
    /// with RabbitMQ's text if one is reached).
    pub fn admit_connection(&self, user: &str, vhost: &str) -> AmqpResult<limits::Ticket> {
        let s = self.snapshot();
        let ul = s.users.get(user).map(|u| u.limits).unwrap_or_default();
        let vl = s.vhosts.get(vhost).map(|v| v.limits).unwrap_or_default();
        self.usage.connection(user, ul, vhost, vl)
    }

    /// Admit a channel of `user` under its `max-channels`.
    pub fn admit_channel(&self, user: &str) -> AmqpResult<limits::Ticket> {
        let ul = self
            .snapshot()
            .users
            .get(user)
            .map(|u| u.limits)
            .unwrap_or_default();
        self.usage.channel(user, ul)
    }

    /// A vhost's limits.
    pub fn vhost_limits(&self, vhost: &str) -> Limits {
        self.snapshot()
            .vhosts
            .get(vhost)
            .map(|v| v.limits)
            .unwrap_or_default()
    }

    /// Check `perm` on a resource; 403 with RabbitMQ's text if refused.
    pub fn check(
        &self,
        user: &str,
        vhost: &str,
        kind: Kind,
        name: &str,
        perm: Perm,
    ) -> AmqpResult<()> {
        let s = self.snapshot();
        let ok = s
            .permissions
            .get(&(vhost.to_owned(), user.to_owned()))
            .is_some_and(|p| p.allows(perm, name));
        if ok {
            Ok(())
        } else {
            Err(refused(kind, name, vhost, user))
        }
    }

    /// Check a topic permission (write or read) on `routing_key` through
    /// `exchange`. No topic permission for the exchange: allowed.
    pub fn check_topic(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        perm: Perm,
    ) -> AmqpResult<()> {
        let s = self.snapshot();
        let key = (vhost.to_owned(), user.to_owned(), exchange.to_owned());
        match s.topic_permissions.get(&key) {
            None => Ok(()),
            Some(t) if t.allows(perm, routing_key, user, vhost) => Ok(()),
            Some(_) => Err(AmqpError::new(
                reply::ACCESS_REFUSED,
                format!(
                    "access to topic '{routing_key}' in exchange '{exchange}' in vhost '{vhost}' refused for user '{user}'"
                ),
            )),
        }
    }
}

/// RabbitMQ's refusal: "access to queue 'q' in vhost 'v' refused for user 'u'".
pub fn refused(kind: Kind, name: &str, vhost: &str, user: &str) -> AmqpError {
    // The default exchange is named as RabbitMQ names it.
    let name = if kind == Kind::Exchange && name.is_empty() {
        "amq.default"
    } else {
        name
    };
    AmqpError::new(
        reply::ACCESS_REFUSED,
        format!(
            "access to {} '{name}' in vhost '{vhost}' refused for user '{user}'",
            kind.name()
        ),
    )
}

/// A well-formed hash no password matches (hashing it costs what a real
/// check costs).
const DUMMY_HASH: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

mod changes;
pub use changes::*;

#[cfg(test)]
mod tests;
